"""Fused BatchNorm2d (+ residual add) (+ ReLU) (moved from dla_fast/ops/batchnorm_act.py; split into modules next)."""
from .op import (batchnorm_act, batchnorm_act_backward, batchnorm_act_forward, batchnorm_act_reference, bn_apply,
                 bn_backward_apply, bn_backward_reduce, channel_stats, check_inputs, fold_running_stats,
                 kernel_configurations)
