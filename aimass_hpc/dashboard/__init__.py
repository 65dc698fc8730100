"""``aimass dashboard``: a small web app on the login node (jobs and models in a browser).

Login-side code like :mod:`aimass_hpc.cli` and :mod:`aimass_hpc.launch`: it may import launch,
config, repo and common; only ``aimass_hpc.cli.dashboard`` imports it (so that ``aimass --help``
never loads fastapi). :func:`aimass_hpc.dashboard.app.create_app` builds the app.
"""
