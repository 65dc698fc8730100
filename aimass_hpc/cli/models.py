"""``aimass models``: list, inspect, search, promote, verify and move model versions."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from aimass_hpc.cli._options import site_option
from aimass_hpc.common.errors import InputError, IntegrityError, NotFoundError
from aimass_hpc.common.units import parse_range
from aimass_hpc.repo.metadata import MODEL_TYPES


class _Ctx:
    """Where the repository is: --repo, else the filesystems.models of the site given with
    --site, else $AIMASS_REPO, else that of $AIMASS_SITE's site.

    An explicit --site beats $AIMASS_REPO: a flag typed on this command line says more than a
    variable set long ago.
    """

    def __init__(self, repo: str | None, site: str | None) -> None:
        self.repo_arg = repo
        self.site = site

    def root(self) -> str:
        if self.repo_arg:
            return self.repo_arg
        if self.site is None and os.environ.get("AIMASS_REPO"):
            return os.environ["AIMASS_REPO"]
        try:
            from aimass_hpc.config.site import load_site
        except ImportError:
            raise InputError(
                "no model repository given: pass --repo PATH or set AIMASS_REPO"
            ) from None
        site = load_site(self.site)
        root = getattr(getattr(site, "filesystems", None), "models", None)
        if not root:
            raise InputError(
                "the site config sets no filesystems.models: pass --repo PATH or set AIMASS_REPO"
            )
        return str(root)

    def open(self, create: bool = False) -> Any:
        from aimass_hpc.repo import ModelRepository

        return ModelRepository(self.root(), create=create)


def _console() -> Console:
    return Console(file=sys.stdout, soft_wrap=False)


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=2, sort_keys=True, default=str))


def _human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _human_count(n: float | None, suffix: str = "") -> str:
    if n is None:
        return "-"
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}{suffix}"
    return f"{n:.3g}{suffix}"


def _metrics_text(metrics: dict[str, Any]) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def _when(v: Any) -> str:
    created = v.created or ""
    return created[:19].replace("T", " ")


def _aliases_by_version(repo: Any, name: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for alias, n in repo.aliases(name).items():
        out.setdefault(n, []).append(alias)
    return out


def _cost_text(v: Any) -> str:
    """FLOPs per sample / peak memory, e.g. ``9.47kFLOP/19.6 KiB``."""
    if v.flops_per_sample is None and v.peak_memory_bytes is None:
        return "-"
    return f"{_human_count(v.flops_per_sample, 'FLOP')}/{_human_bytes(v.peak_memory_bytes)}"


# Below this terminal width the type and FLOPs/memory columns are left out (models show has them).
_WIDE = 130


def _versions_table(repo: Any, versions: Iterable[Any], title: str) -> Table:
    """One row per version; type and cost (FLOPs/memory) columns where some are known and the
    terminal is wide enough for them."""
    versions = list(versions)
    wide = _console().width >= _WIDE
    with_type = wide and any(v.model_type for v in versions)
    with_cost = wide and any(_cost_text(v) != "-" for v in versions)
    table = Table(title=title)
    columns = ["ref", "created", "kind", *(["type"] if with_type else []), "params"]
    columns += [*(["FLOPs/memory"] if with_cost else []), "size", "metrics", "tags", "aliases"]
    for col in columns:
        table.add_column(col, overflow="fold")
    alias_cache: dict[str, dict[int, list[str]]] = {}
    for v in versions:
        if v.name not in alias_cache:
            alias_cache[v.name] = _aliases_by_version(repo, v.name)
        row = [v.ref, _when(v), v.kind, *([v.model_type or "-"] if with_type else [])]
        row += [_human_count(v.param_count), *([_cost_text(v)] if with_cost else [])]
        row += [
            _human_bytes(v.metadata.get("tensor_bytes")),
            _metrics_text(v.metrics),
            ",".join(v.tags),
            ",".join(alias_cache[v.name].get(v.number, [])),
        ]
        table.add_row(*row)
    return table


@click.group()
@click.option(
    "--repo",
    "repo",
    metavar="PATH",
    help="Repository root (default: $AIMASS_REPO, else the site's filesystems.models).",
)
@site_option
@click.pass_context
def models(ctx: click.Context, repo: str | None, site_ref: str | None) -> None:
    """Model repository: versions, aliases, verification, export and import.

    The repository is --repo, else the filesystems.models of the site (--site, here or after
    the subcommand), else $AIMASS_REPO, else that of $AIMASS_SITE's site.
    """
    ctx.obj = _Ctx(repo, site_ref)


def _take_site(ctx: click.Context, _param: click.Parameter, value: str | None) -> None:
    """``aimass models ls --site dev`` means what ``aimass models --site dev ls`` does."""
    if value is not None:
        ctx.ensure_object(_Ctx).site = value  # ensure_object: None, None when run alone


_make_pass_ctx = click.make_pass_decorator(_Ctx)


def pass_ctx(func: Callable[..., Any]) -> Callable[..., Any]:
    """Pass the repository context; every subcommand also takes --site (see ``_take_site``)."""
    return site_option(expose_value=False, callback=_take_site)(_make_pass_ctx(func))


def _is_checkpoint(v: Any) -> bool:
    """A training checkpoint (optimizer, RNG, data position; or sharded), not a final model."""
    return v.kind in ("checkpoint", "sharded")


@models.command("ls")
@click.argument("name", required=False)
@click.option(
    "--checkpoints",
    is_flag=True,
    help="List NAME's checkpoints (default: its final models and a one-line checkpoint summary).",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print JSON instead of a table (every version of NAME, each with its kind).",
)
@pass_ctx
def ls(ctx: _Ctx, name: str | None, checkpoints: bool, as_json: bool) -> None:
    """List models, or the versions of NAME.

    For NAME: its final models and a summary of its checkpoints (how many, the newest);
    --checkpoints lists the checkpoints instead. --json lists every version with its "kind"
    (model, checkpoint or sharded); with --checkpoints only the checkpoints.
    """
    repo = ctx.open()
    if name:
        versions = repo.versions(name)
        ckpts = [v for v in versions if _is_checkpoint(v)]
        if as_json:
            aliases = _aliases_by_version(repo, name)
            _emit_json(
                [
                    {**v.to_dict(), "kind": v.kind, "aliases": aliases.get(v.number, [])}
                    for v in (ckpts if checkpoints else versions)
                ]
            )
            return
        if checkpoints:
            _console().print(
                _versions_table(repo, ckpts, f"{name}: {len(ckpts)} checkpoint(s) ({repo.root})")
            )
            return
        finals = [v for v in versions if not _is_checkpoint(v)]
        _console().print(_versions_table(repo, finals, f"{name} ({repo.root})"))
        if ckpts:
            newest = ckpts[-1]
            click.echo(
                f"{len(ckpts)} checkpoint(s), newest {newest.ref} ({_when(newest)}); "
                f"list them with: aimass models ls {name} --checkpoints"
            )
        return
    from aimass_hpc.repo.refs import Ref

    rows = []
    for model in repo.names():
        numbers = repo.version_numbers(model)
        latest = repo.get(Ref(model, version=numbers[-1]))
        rows.append(
            {
                "name": model,
                "versions": len(numbers),
                "latest": latest.ref,
                "created": latest.created,
                "aliases": repo.aliases(model),
            }
        )
    if as_json:
        _emit_json(rows)
        return
    table = Table(title=f"models in {repo.root}")
    for col in ("name", "versions", "latest", "updated", "aliases"):
        table.add_column(col)
    for r in rows:
        alias_text = " ".join(f"{a}→{n}" for a, n in sorted(r["aliases"].items()))
        table.add_row(
            r["name"], str(r["versions"]), r["latest"], (r["created"] or "")[:19], alias_text
        )
    _console().print(table)


@models.command("show")
@click.argument("ref")
@click.option("--tensors", is_flag=True, help="Also list every stored tensor.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@pass_ctx
def show(ctx: _Ctx, ref: str, tensors: bool, as_json: bool) -> None:
    """Show the metadata of REF (name, name:VERSION or name@ALIAS)."""
    repo = ctx.open()
    v = repo.get(ref)
    aliases = _aliases_by_version(repo, v.name).get(v.number, [])
    manifest = repo.manifest(v.ref) if tensors else None
    if as_json:
        out = {**v.to_dict(), "aliases": aliases}
        if manifest is not None:
            out["tensors"] = manifest
        _emit_json(out)
        return
    m = v.metadata
    table = Table(title=v.ref, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    fields = [
        ("path", str(v.path)),
        ("created", f"{v.created} by {m.get('user')}@{m.get('host')}"),
        ("slurm job", m.get("slurm_job_id") or "-"),
        ("git commit", m.get("git_commit") or "-"),
        ("kind", v.kind),
        ("contents", ", ".join(v.contents)),
        ("parent", v.parent or "-"),
        ("aliases", ", ".join(aliases) or "-"),
        ("parameters", f"{v.param_count:,}"),
        ("tensors", f"{m.get('tensor_count', 0)} ({_human_bytes(m.get('tensor_bytes'))})"),
        ("dtypes", " ".join(f"{k}×{n}" for k, n in (m.get("dtypes") or {}).items()) or "-"),
        ("file size", _human_bytes(v.file_size)),
        ("type", v.model_type or "-"),
        ("FLOPs/sample", _human_count(v.flops_per_sample, "FLOP")),
        ("peak memory", _human_bytes(v.peak_memory_bytes)),
        ("metrics", _metrics_text(v.metrics) or "-"),
        ("hyperparameters", json.dumps(v.hyperparameters) if v.hyperparameters else "-"),
        ("tags", ", ".join(v.tags) or "-"),
        ("description", v.description or "-"),
        ("recipe", json.dumps(v.recipe) if v.recipe else "-"),
        ("run", json.dumps(v.run) if v.run else "-"),
        ("framework", " ".join(f"{k}={x}" for k, x in (m.get("framework") or {}).items())),
    ]
    if v.kind == "sharded":
        fields.insert(5, ("shards", f"{m.get('world_size')} (key {m.get('shard_key')})"))
    for key, value in fields:
        table.add_row(key, str(value))
    console = _console()
    console.print(table)
    if manifest is not None:
        tt = Table(title=f"tensors of {v.ref}")
        for col in ("name", "dtype", "shape", "bytes", "stored", "xxh3"):
            tt.add_column(col, overflow="fold")
        for e in manifest:
            tt.add_row(
                e["name"],
                str(e["dtype"]),
                "×".join(map(str, e["shape"])) or "scalar",
                _human_bytes(e["nbytes"]),
                e["stored"],
                e["checksum"],
            )
        console.print(tt)


@models.command("search")
@click.option("--name", "name", default="*", show_default=True, help="Model name glob.")
@click.option("--tag", "tags", multiple=True, help="Required tag (repeatable).")
@click.option(
    "--metric",
    "metrics",
    multiple=True,
    metavar="NAME=LO..HI",
    help="Metric range, ends inclusive and optional, e.g. acc=0.9.. (repeatable; LO:HI too).",
)
@click.option(
    "--type",
    "model_type",
    type=click.Choice(list(MODEL_TYPES)),
    help="What the model is for (recorded when a training finishes or a recipe is imported).",
)
@click.option(
    "--flops",
    metavar="LO..HI",
    help="FLOPs per sample of one forward pass, e.g. 1K..10M or ..5G. Counts are decimal: "
    "k/K/M/G/T/P are powers of 1000.",
)
@click.option(
    "--memory",
    metavar="LO..HI",
    help="Peak memory of one sample's forward pass, e.g. ..64M. Sizes are binary, as in Slurm "
    "and the site's mem values: K/M/G/T (also KiB..TiB, KB..TB) are powers of 1024.",
)
@click.option("--since", help="Created at or after (ISO date or age like 7d).")
@click.option("--until", help="Created at or before (ISO date or age like 1d).")
@click.option("--kind", type=click.Choice(["model", "checkpoint", "sharded"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@pass_ctx
def search(
    ctx: _Ctx,
    name: str,
    tags: tuple[str, ...],
    metrics: tuple[str, ...],
    flops: str | None,
    memory: str | None,
    since: str | None,
    until: str | None,
    kind: str | None,
    model_type: str | None,
    as_json: bool,
) -> None:
    """Find versions by name, type, tags, metric ranges, FLOPs, memory and date.

    Ranges are LO..HI (or LO:HI), both ends inclusive and either one optional. Example:
    aimass models search --type classifier --flops 1K..10M --memory ..64M
    """
    ranges = {}
    for item in metrics:
        key, sep, rng = item.partition("=")
        if not sep or not key:
            raise InputError(f"invalid --metric {item!r}: expected NAME=LO:HI, e.g. acc=0.9:")
        ranges[key] = parse_range(rng, f"range for metric {key}")
    flops_range = parse_range(flops, "--flops", "count") if flops else None
    memory_range = parse_range(memory, "--memory", "memory") if memory else None
    repo = ctx.open()
    found = repo.search(
        name,
        tags=list(tags) or None,
        metrics=ranges,
        flops=flops_range,
        memory=memory_range,
        since=since,
        until=until,
        kind=kind,
        model_type=model_type,
    )
    if as_json:
        _emit_json([v.to_dict() for v in found])
        return
    _console().print(_versions_table(repo, found, f"{len(found)} matching version(s)"))


@models.command("promote")
@click.argument("ref")
@click.argument("alias")
@click.option(
    "--repair",
    is_flag=True,
    help="If the alias file is damaged, keep a copy of it and start a new history.",
)
@pass_ctx
def promote(ctx: _Ctx, ref: str, alias: str, repair: bool) -> None:
    """Point ALIAS of a model at REF (name:VERSION or name@OTHER_ALIAS).

    A damaged alias file is refused (exit 6) so that its history is not lost silently; with
    --repair it is kept as aliases/.ALIAS.json.corrupt-TIME and a new history starts.
    """
    from aimass_hpc.repo.refs import Ref

    r = Ref.parse(ref, "REF")
    repo = ctx.open()
    target = repo.get(r)
    try:
        previous = repo.alias_version(r.name, alias)
    except IntegrityError:
        if not repair:
            raise
        previous = None
    repo.promote(r.name, target.number, alias, repair=repair)
    was = f" (was {r.name}:{previous})" if previous is not None else ""
    click.echo(f"{r.name}@{alias} -> {target.ref}{was}")
    if repair:
        for entry in repo.alias_history(r.name, alias)[:1]:
            if entry.get("action") == "repair" and previous is None:
                click.echo(
                    f"repaired {r.name}@{alias}: the damaged alias file ({entry.get('problem')}) "
                    f"is kept as aliases/{entry.get('kept_as')}",
                    err=True,
                )


@models.command("rollback")
@click.argument("ref", metavar="NAME@ALIAS")
@pass_ctx
def rollback(ctx: _Ctx, ref: str) -> None:
    """Point NAME@ALIAS back at its previous target."""
    from aimass_hpc.repo.refs import Ref

    r = Ref.parse(ref, "NAME@ALIAS")
    if r.alias is None:
        raise InputError(f"rollback needs NAME@ALIAS, got {ref!r}")
    name, alias = r.name, r.alias
    repo = ctx.open()
    before = repo.alias_version(name, alias)
    v = repo.rollback(name, alias)
    click.echo(f"{name}@{alias} -> {v.ref} (was {name}:{before})")


@models.command("rm")
@click.argument("refs", nargs=-1, required=True, metavar="NAME:VERSION...")
@click.option(
    "--force", is_flag=True, help="Delete even versions an alias points at (it then dangles)."
)
@click.option("--dry-run", is_flag=True, help="Only show what would be deleted.")
@click.option("-y", "--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_ctx
def rm(ctx: _Ctx, refs: tuple[str, ...], force: bool, dry_run: bool, yes: bool) -> None:
    """Delete versions: NAME:VERSION, NAME@ALIAS or a range NAME:LO..HI (never a whole model).

    A range is inclusive and may leave one end open (NAME:..7, NAME:3..). A range holding a
    version an alias points at is refused, naming it, unless --force.
    """
    from aimass_hpc.repo.refs import Ref, VersionRange

    parsed: list[Ref | VersionRange] = []
    for text in refs:
        span = VersionRange.parse(text, "NAME:LO..HI")
        if span is not None:
            parsed.append(span)
            continue
        r = Ref.parse(text, "NAME:VERSION")
        if r.is_latest:  # NAME, NAME:latest: a moving target, never deleted by name
            raise InputError(
                f"say which version of {r.name} to delete: {r.name}:N, {r.name}:LO..HI "
                f"or {r.name}@ALIAS"
            )
        parsed.append(r)
    repo = ctx.open()
    # Resolve everything first (a range checks its aliases): fail before deleting any.
    versions = []
    singles: set[str] = set()  # named one by one: gone meanwhile is an error, not in a range
    for p in parsed:
        if isinstance(p, Ref):
            versions.append(repo.get(p))
            singles.add(versions[-1].ref)
        else:
            versions += repo.delete_range(p.name, p.lo, p.hi, force=force, dry_run=True)
    unique = {v.ref: v for v in versions}
    if dry_run:
        for v in unique.values():
            click.echo(f"would delete {v.ref} ({v.kind})")
        click.echo(f"would delete {len(unique)} version(s)")
        return
    if not yes:
        click.confirm(f"delete {', '.join(unique)}?", abort=True)
    for v in unique.values():
        try:
            repo.delete(v.ref, force=force)
        except NotFoundError:
            if v.ref in singles:
                raise
            continue  # part of a range and deleted meanwhile
        click.echo(f"deleted {v.ref}")


@models.command("verify")
@click.argument("refs", nargs=-1, metavar="[REF]...")
@click.option("--all", "all_versions", is_flag=True, help="Every version of the named models.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON reports.")
@pass_ctx
def verify(ctx: _Ctx, refs: tuple[str, ...], all_versions: bool, as_json: bool) -> None:
    """Re-hash every tensor; exit 6 naming the tensor if anything is corrupt or truncated.

    Without REF, verifies the latest version of every model (with --all: every version).
    """
    from aimass_hpc.repo.refs import Ref

    parsed = [Ref.parse(ref, "REF") for ref in refs]
    repo = ctx.open()
    targets: list[str] = []
    names = [str(r) for r in parsed] if refs else repo.names()
    for ref in names:
        if all_versions:
            targets += [v.ref for v in repo.versions(Ref.parse(ref).name)]
        else:
            targets.append(repo.get(ref).ref if refs else repo.latest(ref).ref)
    reports = [repo.verify(t) for t in targets]
    if as_json:
        _emit_json([r.to_dict() for r in reports])
    else:
        console = _console()
        for r in reports:
            style = "green" if r.ok else "bold red"
            console.print(f"[{style}]{'OK ' if r.ok else 'BAD'}[/] {r.message}", highlight=False)
    bad = [r for r in reports if not r.ok]
    if bad:
        more = f" (+{len(bad) - 1} more)" if len(bad) > 1 else ""
        raise IntegrityError(f"{bad[0].message}{more}")


@models.command("export")
@click.argument("ref")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["safetensors", "torch", "hdf5", "onnx"]),
    default="safetensors",
    show_default=True,
    help="onnx: the rebuilt module via torch.onnx, checked with onnxruntime (see --tolerance).",
)
@click.option(
    "--compression", type=click.Choice(["gzip", "lzf"]), help="For --format hdf5 (archives)."
)
@click.option(
    "--dtype",
    metavar="bf16|fp16",
    help="Cast floating tensors to bf16 or fp16 (others kept); needs the model's recipe.",
)
@click.option(
    "--quantize",
    metavar="int8|int8-weight-only",
    help="Quantize linear layers with torchao: int8 = int8 weights and dynamic int8 "
    "activations, int8-weight-only = weights only; needs the model's recipe.",
)
@click.option(
    "--store",
    "store_as",
    metavar="NAME",
    help="Store the --dtype/--quantize result as a new version of NAME (may be REF's own "
    "model), with its parent, settings, size and accuracy delta. PATH is then optional.",
)
@click.option(
    "--samples",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Random input batches (from the recipe's input_shape) the accuracy delta is measured on.",
)
@click.option(
    "--tolerance",
    default=1e-4,
    show_default=True,
    type=float,
    help="--format onnx: the largest absolute difference from torch's outputs accepted; "
    "beyond it nothing is written (exit 1).",
)
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Print the export report as JSON.")
@pass_ctx
def export(
    ctx: _Ctx,
    ref: str,
    path: str | None,
    fmt: str,
    compression: str | None,
    dtype: str | None,
    quantize: str | None,
    store_as: str | None,
    samples: int,
    tolerance: float,
    force: bool,
    as_json: bool,
) -> None:
    """Write REF to PATH as safetensors, a torch.save file, an HDF5 archive or ONNX.

    --dtype/--quantize compress it first (rebuilt from its recipe) and print the size and the
    max/mean absolute output difference from the original on random inputs; --store keeps
    the result in the repository as a new version. Examples:

    \b
    aimass models export net:3 net-bf16.safetensors --dtype bf16
    aimass models export net:3 --quantize int8 --store net
    aimass models export net:3 net.onnx --format onnx --tolerance 1e-5
    """
    if dtype is not None and quantize is not None:
        raise InputError("give --dtype or --quantize, not both")
    compressing = dtype is not None or quantize is not None
    if fmt == "onnx" and (compressing or store_as):
        raise InputError(
            "--format onnx exports the original float32 model; --dtype, --quantize and "
            "--store apply to the repository formats (safetensors, torch, hdf5)"
        )
    if store_as is not None and not compressing:
        raise InputError("--store keeps a compressed copy: give --dtype or --quantize")
    if path is None and store_as is None:
        raise InputError("give PATH to write, or --store NAME to keep the result in the repository")
    if not compressing and fmt != "onnx":
        repo = ctx.open()
        v = repo.get(ref)
        out = repo.export(v.ref, path, fmt, compression=compression, overwrite=force)
        if as_json:
            _emit_json({"source": v.ref, "format": fmt, "path": str(out)})
        else:
            click.echo(f"exported {v.ref} to {out} ({fmt})")
        return
    _export_compressed(
        ctx,
        ref,
        path,
        fmt,
        compression,
        dtype,
        quantize,
        store_as,
        samples,
        tolerance,
        force,
        as_json,
    )


def _export_compressed(
    ctx: _Ctx,
    ref: str,
    path: str | None,
    fmt: str,
    compression: str | None,
    dtype: str | None,
    quantize: str | None,
    store_as: str | None,
    samples: int,
    tolerance: float,
    force: bool,
    as_json: bool,
) -> None:
    """--dtype, --quantize, --format onnx: the work is in aimass_hpc.repo.compress."""
    from pathlib import Path

    from aimass_hpc.repo import compress, portable

    if dtype is not None:
        compress.parse_dtype(dtype)  # a bad value is refused before anything loads
    if quantize is not None:
        compress.parse_scheme(quantize)
    if store_as is not None:
        from aimass_hpc.repo.refs import check_name

        check_name(store_as)
    repo = ctx.open()
    ckpt = repo.load(ref, mmap=True, verify=True)
    v = ckpt.version
    if fmt == "onnx":
        assert path is not None
        onnx = compress.export_onnx(
            ckpt, Path(path), tolerance=tolerance, samples=samples, overwrite=force
        )
        if as_json:
            _emit_json(onnx.report())
            return
        click.echo(
            f"exported {v.ref} to {onnx.path} (onnx, {_human_bytes(onnx.size_bytes)}): "
            f"onnxruntime matches torch within {tolerance:g}, max abs diff "
            f"{onnx.max_abs_diff:.3g}, mean {onnx.mean_abs_diff:.3g} on {samples} random "
            f"batch(es)"
        )
        return
    result = compress.compress(ckpt, dtype=dtype, quantize=quantize, samples=samples)
    report = result.report()
    what = result.settings.get("dtype") or result.settings.get("quantize")
    lines = []
    if path is not None:
        out = portable.export(
            compress.as_checkpoint(result, v), Path(path), fmt, compression, force
        )
        report["path"] = str(out)
        lines.append(f"exported {v.ref} to {out} ({fmt}, {what})")
    if store_as is not None:
        stored = compress.store(repo, result, v, store_as)
        report["stored"] = stored.ref
        lines.append(f"stored {what} of {v.ref} as {stored.ref}")
    if as_json:
        _emit_json(report)
        return
    for line in lines:
        click.echo(line)
    share = result.size_bytes / result.source_size_bytes if result.source_size_bytes else 0
    click.echo(
        f"size {_human_bytes(result.size_bytes)} ({share:.0%} of "
        f"{_human_bytes(result.source_size_bytes)}); output vs original: max abs diff "
        f"{result.delta['max_abs']:.3g}, mean {result.delta['mean_abs']:.3g} on {samples} "
        f"random batch(es)"
    )


@models.command("import")
@click.argument("path", type=click.Path(dir_okay=False))
@click.argument("name")
@click.option("--tag", "tags", multiple=True, help="Tag (repeatable).")
@click.option("--metric", "metrics", multiple=True, metavar="NAME=VALUE", help="Metric.")
@click.option("--description", help="Free text.")
@click.option("--recipe", metavar="JSON", help="How serving rebuilds the model (JSON).")
@click.option(
    "--type",
    "model_type",
    type=click.Choice(list(MODEL_TYPES)),
    help="What the model is for (default: the recipe's model_type).",
)
@pass_ctx
def import_cmd(
    ctx: _Ctx,
    path: str,
    name: str,
    tags: tuple[str, ...],
    metrics: tuple[str, ...],
    description: str | None,
    recipe: str | None,
    model_type: str | None,
) -> None:
    """Import a torch (.pt), safetensors or exported HDF5 file as a new version of NAME.

    With a recipe (--recipe, or one stored in an exported file) the model is rebuilt once on
    the CPU to record its FLOPs per sample and peak memory (see aimass models search).
    """
    kwargs: dict[str, Any] = {}
    if tags:
        kwargs["tags"] = list(tags)
    if metrics:
        parsed = {}
        for item in metrics:
            key, sep, value = item.partition("=")
            try:
                parsed[key] = float(value)
            except ValueError:
                sep = ""
            if not sep or not key:
                raise InputError(f"invalid --metric {item!r}: expected NAME=NUMBER")
        kwargs["metrics"] = parsed
    if description is not None:
        kwargs["description"] = description
    if recipe is not None:
        try:
            kwargs["recipe"] = json.loads(recipe)
        except ValueError as exc:
            raise InputError(f"--recipe is not valid JSON: {exc}") from None
    if model_type is not None:
        kwargs["model_type"] = model_type
    repo = ctx.open(create=True)
    v = repo.import_(path, name, stats=_import_stats, **kwargs)
    click.echo(f"imported {path} as {v.ref}")


def _import_stats(recipe: Any, state_dict: Any) -> dict[str, Any]:
    """FLOPs/memory/type of an imported model; a recipe that cannot be built is noted."""
    from aimass_hpc.runtime.model_stats import stats_from_recipe

    try:
        return stats_from_recipe(recipe, state_dict)
    except Exception as exc:  # the import itself must still succeed
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        click.echo(f"aimass: note: FLOPs and memory not measured: {first}", err=True)
        declared = recipe.get("model_type") if isinstance(recipe, dict) else None
        return {"model_type": declared} if declared in MODEL_TYPES else {}


@models.command("import-hf")
@click.argument("directory", type=click.Path(file_okay=False, path_type=str))
@click.argument("name")
@click.option("--tag", "tags", multiple=True, help="Tag the new version (repeatable).")
@click.option("--description", help="Free text shown by `models show`.")
@click.option("--json", "as_json", is_flag=True, help="Print the new version as JSON.")
@pass_ctx
def import_hf_cmd(
    ctx: _Ctx,
    directory: str,
    name: str,
    tags: tuple[str, ...],
    description: str | None,
    as_json: bool,
) -> None:
    """Store a Hugging Face model directory (config, tokenizer, *.safetensors) as a new
    version of NAME, byte-exact; serve it with `aimass serve NAME:N --engine vllm`."""
    from aimass_hpc.repo.hf import import_hf

    repo = ctx.open(create=True)
    v = import_hf(repo, directory, name, tags=list(tags), description=description)
    if as_json:
        _emit_json(v.to_dict())
        return
    r = v.recipe
    click.echo(
        f"imported {v.ref}: {', '.join(r['architectures']) or r['model_type']}, "
        f"{_human_count(r['parameters'])} parameters, vocab {r['vocab_size']}, "
        f"context {r['context_length']}, {len(r['files'])} files "
        f"({_human_bytes(sum(f['size'] for f in r['files']))})"
    )


@models.command("gc")
@click.option(
    "--grace",
    default="1h",
    show_default=True,
    help="Keep leftovers younger than this (writers on other nodes may still be busy).",
)
@click.option("--dry-run", is_flag=True, help="Only show what would be removed.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def gc(ctx: _Ctx, grace: str, dry_run: bool, as_json: bool) -> None:
    """Remove leftovers of crashed or interrupted saves and deletes."""
    seconds = _parse_age(grace)
    report = ctx.open().gc(grace_seconds=seconds, dry_run=dry_run)
    if as_json:
        _emit_json(report.to_dict())
        return
    verb = "would remove" if dry_run else "removed"
    for path in report.removed:
        click.echo(f"{verb} {path}")
    click.echo(
        f"{verb} {len(report.removed)} item(s), {_human_bytes(report.bytes_freed)}; "
        f"{len(report.kept_in_progress)} in progress kept"
    )


def _parse_age(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smhdw]?)\s*", text)
    if not m:
        raise InputError(f"invalid --grace {text!r}: expected e.g. 30m, 1h, 2d or seconds")
    scale = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
    return float(m.group(1)) * scale


@models.command("aliases")
@click.argument("ref", metavar="NAME[@ALIAS]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def aliases(ctx: _Ctx, ref: str, as_json: bool) -> None:
    """Show the aliases of NAME, or the history of NAME@ALIAS."""
    from aimass_hpc.repo.refs import Ref

    r = Ref.parse(ref, "NAME[@ALIAS]")
    if r.version is not None:
        raise InputError(f"aliases needs NAME or NAME@ALIAS, got {ref!r}")
    name, alias = r.name, r.alias
    repo = ctx.open()
    if alias is not None:
        history = repo.alias_history(name, alias)
        if as_json:
            _emit_json(history)
            return
        table = Table(title=f"history of {ref}")
        for col in ("at", "action", "version", "previous", "user", "host"):
            table.add_column(col)
        for e in history:
            table.add_row(
                str(e.get("at", ""))[:19],
                str(e.get("action")),
                str(e.get("version")),
                str(e.get("previous") or "-"),
                str(e.get("user")),
                str(e.get("host")),
            )
        _console().print(table)
        return
    current = repo.aliases(name)
    if as_json:
        _emit_json(current)
        return
    table = Table(title=f"aliases of {name}")
    table.add_column("alias")
    table.add_column("version")
    for a, n in sorted(current.items()):
        table.add_row(a, f"{name}:{n}")
    _console().print(table)
