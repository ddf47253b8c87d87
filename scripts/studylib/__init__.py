"""scripts/studies.py's library: plan (runs), records (results/studies), execute (training children), tables
(mean +- SE over seeds), figures. `scripts/` must be on sys.path (studies.py puts it there)."""
