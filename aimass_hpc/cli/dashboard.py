"""``aimass dashboard``: the web dashboard (jobs and models in a browser) on the login node."""

from __future__ import annotations

import click

from aimass_hpc.cli._options import site_option


@click.command()
@site_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=8765, show_default=True)
@click.option(
    "--base-url",
    default="/",
    show_default=True,
    help="URL prefix the app is reached under (behind Open OnDemand: /node/HOST/PORT/).",
)
@click.option(
    "--admin",
    "admins",
    multiple=True,
    metavar="USER",
    help="A user who sees every user's jobs (repeatable).",
)
@click.option("--repo", default=None, help="Model repository (default: the site's).")
@click.option(
    "--token-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where to write the login token, mode 0600 (default: ~/.cache/aimass/dashboard-token).",
)
def dashboard(
    site_ref: str | None,
    host: str,
    port: int,
    base_url: str,
    admins: tuple[str, ...],
    repo: str | None,
    token_file: str | None,
) -> None:
    """Serve the web dashboard: your jobs (logs, metrics, cancel) and the model repository.

    Prints a one-time login URL (the token is also written to a 0600 file); reach it through
    an SSH tunnel (ssh -L 8765:127.0.0.1:8765 LOGIN_NODE) or Open OnDemand
    (examples/ondemand-dashboard/).
    """
    from aimass_hpc.config.site import load_site
    from aimass_hpc.dashboard.launch import prepare, serve

    site_obj = load_site(site_ref)
    ready = prepare(site_obj, host=host, port=port, base_url=base_url, admins=admins,
                    repo=repo, token_file=token_file)  # fmt: skip
    click.echo(f"aimass dashboard for {ready.viewer} on site {site_obj.name}")
    click.echo(f"  open:  {ready.login_url}")
    click.echo(f"  token: {ready.token}  (also in {ready.token_file}; valid for one login)")
    serve(ready.app, host, port)
