"""What a run shows: depth diagnostics (depth_probe, diagnostics), throughput and MFU (perf_monitor), the
figures both the dashboards and `deepres report` draw (depth_figures, report), sweep tables (sweep_summary)
and the wandb logger (wandb_logging)."""
