"""The DLA aggregation node, fused (moved from dla_fast/ops/aggregate.py; split into modules next)."""
from .op import (aggregate, aggregate_bwd, aggregate_fwd, aggregate_reference, aggregate_stats_merge_kernel,
                 check_inputs, kernel_configurations)
