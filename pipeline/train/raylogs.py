"""Runs in every Ray worker process of a training job (runtime_env worker_process_setup_hook): keeps the console
readable. Kept tiny on purpose: each Ray worker process imports it at startup."""
import logging

# Without Ray's dashboard (not installed here) Ray Train's placement-group cleaner cannot reach the State API
# and warns about it every second for the whole run; it still does its job.
NOISY_LOGGERS = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",)


def quiet() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
