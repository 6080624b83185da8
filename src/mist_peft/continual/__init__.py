"""Exemplar-free class-incremental learning on top of (MIST-tuned) backbones: scenarios, hosts, metrics."""

from .hosts import RanPAC, SimpleCIL
from .metrics import continual_metrics, load_continual_metric
from .scenarios import Task, class_incremental, class_order, clinc150_domain_groups

__all__ = [
    "Task",
    "class_incremental",
    "class_order",
    "clinc150_domain_groups",
    "SimpleCIL",
    "RanPAC",
    "continual_metrics",
    "load_continual_metric",
]
