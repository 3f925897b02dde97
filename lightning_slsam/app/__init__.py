"""The application: ``slsam-train`` (``cli``, ``config_schema``, ``run_stats``, ``warmup_schedule``) and
``slsam-report`` (``report``, ``sweep_summary``), on top of the adapters, ``models`` and ``data``."""
