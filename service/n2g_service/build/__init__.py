"""Whole-model builds: the plan of work units (`plan`), executors (`executors`: in-process and
Ray), progress bars (`progress`) and the dry run (`summary.plan_summary`)."""

from .plan import FitGroup, ScanShard, fit_groups, parse_layers, shard_ranges

__all__ = ["FitGroup", "ScanShard", "fit_groups", "parse_layers", "shard_ranges"]
