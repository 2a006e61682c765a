"""Weight sync: bucketed, dtype-cast tensors behind CUDA IPC or shared-memory handles, described by a JSON manifest.

The producer side is `BucketSender` (or `export_manifest` for one-request producers); the receiving side is
`BucketImporter`, written against the small `WeightTarget` protocol an engine implements.
"""

from colocate.dtypes import DTYPES as SUPPORTED_DTYPES
from colocate.memory.layout import ALIGN_BYTES as ALIGN
from colocate.weight_sync.buckets import DEFAULT_BUCKET_BYTES, bucket_views, fill_bucket, plan_buckets
from colocate.weight_sync.cuda_ipc import device_for_uuid
from colocate.weight_sync.handles import ExportedBucket, OpenedBucket, allocate_bucket, device_uuid, open_bucket
from colocate.weight_sync.importer import BucketImporter, WeightTarget
from colocate.weight_sync.manifest import FORMAT, BucketLayout, TensorSlot, WeightManifest
from colocate.weight_sync.sender import BucketSender, BucketTransport, UnknownLayoutError, export_manifest

__all__ = ["ALIGN", "DEFAULT_BUCKET_BYTES", "FORMAT", "SUPPORTED_DTYPES", "BucketImporter", "BucketLayout",
           "BucketSender", "BucketTransport", "ExportedBucket", "OpenedBucket", "TensorSlot", "UnknownLayoutError",
           "WeightManifest", "WeightTarget", "allocate_bucket", "bucket_views", "device_for_uuid", "device_uuid",
           "export_manifest", "fill_bucket", "open_bucket", "plan_buckets"]
