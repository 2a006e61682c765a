"""Shared parts of the benchmark scripts: config and flags, measuring, floors, peers, checks and the report."""

# config: device, dtype, flags from the config's fields   measure: timed calls, first vs steady
# floors: PCIe and HBM bandwidth measured in the run        device: free memory, the allocator's state
# checks: weight fingerprints, greedy tokens               report: rows, text tables, the JSON file
# engine_internals: every use of the engine's internals    peers/: what colocate is compared with
# model_measures: load peaks, teacher-forced KL between two models (the fp8 bench)
# weight_sync_report, rollout_report: the summaries and tables of bench_weight_sync and bench_rollout
