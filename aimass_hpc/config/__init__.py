"""What the user and the site admin write: site configs and the job, train and search specs.

Runs on the login node (``aimass`` reads and checks every spec and site file before anything
is rendered or queued). Imports only ``common``, plus ``hpo`` (search spaces) and ``runtime``
(the run config a training job reads); never ``launch`` or ``cli``:

  site         site configs (partitions, modules, launcher, runs root, templates)
  job_spec     ``aimass submit`` job specs -> ``JobRequest``
  train_spec   ``aimass train`` specs -> the planned job and its run config
  search_spec  ``aimass search`` specs -> space, objective, budget and the trial's train spec
"""
