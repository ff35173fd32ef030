"""Profile builds: size, latency (p50/p90/p95/p99, throughput, batch sweep), peak memory,
per-layer time and accuracy vs the FP32 reference, for every folder under engines/.

- latency:     latency_stats (pure), measure_latency, batch_sweep
- memory:      peak RSS growth of inference (/proc/self/status, fresh process per engine)
- size:        artifact bytes on disk, weight bytes by data type
- layers:      ONNX Runtime profiler trace -> time per op type / node
- accuracy:    evaluation set, NME deltas vs reference, pass/fail, CED for plots
- builds:      reading and checking build.json
- environment: CPU, cores, GPU, versions
- result:      rows (manifests' VariantRecord) from measurements, profile_manifest, speedups, what_ran_where
- profiler:    profile_engines, the one entry point
"""

from cunet_optimize.manifests.build import BUILD_SCHEMA
from cunet_optimize.profiling.builds import BuildFolderError, BuildFolder, find_builds, read_build
from cunet_optimize.profiling.latency import batch_sweep, latency_stats, measure_latency
from cunet_optimize.profiling.profiler import profile_engines
from cunet_optimize.manifests.profile import (BUNDLE_ONLY_STATUS, PROFILE_SCHEMA, VariantRecord, read_profile,
                                             summary_rows)
from cunet_optimize.profiling.result import profile_manifest, variant_record

__all__ = [
    "BUILD_SCHEMA",
    "BUNDLE_ONLY_STATUS",
    "PROFILE_SCHEMA",
    "BuildFolderError",
    "BuildFolder",
    "VariantRecord",
    "batch_sweep",
    "find_builds",
    "latency_stats",
    "measure_latency",
    "profile_engines",
    "read_build",
    "profile_manifest",
    "variant_record",
    "read_profile",
    "summary_rows",
]
