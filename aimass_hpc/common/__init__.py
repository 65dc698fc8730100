"""Shared ground: the error types, file-system helpers, time limits, name rules, Slurm states.

Runs on both sides (login node and inside jobs) and imports no other ``aimass_hpc`` package,
so every layer may use it:

  errors        the exception classes and their exit codes
  fsutil        atomic writes, checked reads of user files, OS errors as one-line messages
  timelimit     Slurm time-limit parsing and formatting
  names         the one set of name rules (partitions, env names, model names, ...)
  slurm_states  job states and their normalisation

``names`` lives here rather than in ``config`` because ``repo`` and ``hpo`` use it too, and
``config`` itself imports ``hpo`` (search spaces) and ``runtime`` (the run config), so a rule
module inside ``config`` would make those packages depend upward.
"""
