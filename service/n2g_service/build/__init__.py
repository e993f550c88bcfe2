"""Whole-model builds: what a build asks (`request`), its plan of work units (`plan`), the driver
that runs and commits them (`runner.run_build`), the work of one fit group (`compute`), the
executors that run units (`executors`: in-process and Ray) and the dry run
(`summary.plan_summary`). Progress is drawn by the command line
(`n2g.cli`), from the job's events, the same for a local and a remote build."""

from .plan import FitGroup, ScanShard, fit_groups, shard_ranges

__all__ = ["FitGroup", "ScanShard", "fit_groups", "shard_ranges"]
