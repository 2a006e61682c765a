"""What colocate is compared with, each peer measured in the same run on the same shapes."""

# Sleep/wake: host_offload (naive .cpu()/.cuda() per tensor), memory_saver (torch_memory_saver),
# first_touch (the first to_empty or flat materialize of a process); isolated runs those two in a
# fresh interpreter. Weight sync: per_tensor_ipc, cpu_round_trip, disk_reload.
