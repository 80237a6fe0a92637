"""The plugins ddpm-perf ships, installed as ``ddpm_perf_plugins`` and registered through the
same ``ddpm_perf.plugins`` entry points a third-party package uses (see setup.py)."""
