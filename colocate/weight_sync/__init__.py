"""Weight sync: bucketed, dtype-cast tensors behind CUDA IPC or shared-memory handles, described by a JSON manifest."""

from colocate.weight_sync.export import export_manifest
from colocate.weight_sync.handles import ExportedBucket, OpenedBucket, allocate_bucket, device_uuid, open_bucket
from colocate.weight_sync.manifest import (ALIGN, FORMAT, SUPPORTED_DTYPES, BucketLayout, TensorSlot, WeightManifest,
                                           bucket_views, fill_bucket, plan_buckets)

__all__ = ["ALIGN", "FORMAT", "SUPPORTED_DTYPES", "BucketLayout", "ExportedBucket", "OpenedBucket", "TensorSlot",
           "WeightManifest", "allocate_bucket", "bucket_views", "device_uuid", "export_manifest", "fill_bucket", "open_bucket",
           "plan_buckets"]
