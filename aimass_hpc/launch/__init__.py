"""Putting work on the cluster: render, submit, track runs, drive searches, start services.

Runs on the login node (and in the search driver's own batch job, which runs the same
code). Builds on ``config`` and ``common``; may use ``hpo``, ``runtime``, ``serve`` and
``repo`` helpers; never imports ``cli``:

  render         spec + site + templates -> the exact job script
  runs           run directories on the shared file system and the job index
  submit         render, write the run directory, queue with the scheduler
  scheduler/     scheduler backends (``slurm``, ``local``) behind one interface
  journal        a search's append-only journal and its replay
  search_driver  the search driver: asks the sampler, submits trials, settles results
  search_plots   plots of a search from its journal
  search_launch  start, find, drive and cancel searches (the work behind ``aimass search``)
  serving        serving services: start, upgrade, reconcile and stop endpoints
  site_check     validate a site and render every template (``aimass site check``)
  reservations   ``scontrol create|show|delete reservation`` (``aimass reserve``)
"""
