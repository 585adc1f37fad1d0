"""``cucrf refine`` over many images: one task per image on local worker processes or a dask cluster.

Each image is refined by the ordinary single-image ``refine`` in a task; its outputs are written
under temporary names and renamed when all are complete, so an output that exists is a finished
one (``--resume`` skips those images). A failing image is reported at the end and does not stop
the others. With ``--workers N`` the tasks run on a ``dask.distributed`` LocalCluster of N
processes, with ``--scheduler ADDRESS`` on a running cluster; a worker that dies has its task run
again on another worker.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import uuid
import warnings
from pathlib import Path

from ._errors import CLIError, error_text
from ._tiles import check_not_existing, remove_temporaries, replace, temporary_path

#: Seconds to wait for a scheduler given with --scheduler.
CONNECT_TIMEOUT = 10

# The outputs of one image, in the order refine's options name them.
_KINDS = ("labels", "probabilities", "overlay", "comparison")
_OPTION = {"probabilities": "save_probabilities", "overlay": "overlay", "comparison": "comparison"}


def wants_many(args) -> bool:
    """Whether the images go through this module (workers, a scheduler, --resume or --overwrite)."""
    return bool(args.workers or args.scheduler or args.resume or args.overwrite)


def make_client(args):
    """A ``distributed.Client``: on ``--scheduler``, or on a LocalCluster of ``--workers`` processes."""
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise CLIError(f"--workers and --scheduler need the dask extra: pip install 'cucrf[dask]' "
                       f"({error_text(exc)})") from None
    if args.scheduler:
        try:
            return Client(args.scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError, ValueError) as exc:
            raise CLIError(f"--scheduler {args.scheduler!r}: no dask scheduler answered within {CONNECT_TIMEOUT} s "
                           f"({error_text(exc)}); start one with 'dask scheduler' and give its address, such as "
                           "tcp://HOST:8786") from None
    # One task at a time per process, each holding one image or tile; cucrf's own threads share
    # the cores among the processes (see run_many).
    # Each worker process gets its share of this machine's cores as cucrf threads (unless
    # CUCRF_NUM_THREADS is set); on a cluster (--scheduler) workers keep cucrf's default.
    threads = os.environ.get("CUCRF_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // args.workers))
    cluster = LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           silence_logs=40, env={"CUCRF_NUM_THREADS": threads})
    client = Client(cluster)
    client._cucrf_cluster = cluster  # closed with the client below
    return client


def close_client(client) -> None:
    cluster = getattr(client, "_cucrf_cluster", None)
    client.close()
    if cluster is not None:
        cluster.close()


def run_many(args) -> int:
    """Refine every IMAGE as its own task; report the failures at the end (exit status 1 if any)."""
    from tqdm import tqdm

    from . import refine

    n = len(args.images)
    if len(args.unary) != n:
        from ._errors import UsageError

        raise UsageError(f"got {n} image(s) but {len(args.unary)} --unary file(s); give one unary "
                         "per image, in the same order")
    paths = refine._outputs(args)
    options = {"labels": "-o/--output" if args.output is not None else "--out-dir",
               "probabilities": "--save-probabilities", "overlay": "--overlay", "comparison": "--comparison"}
    every_output = [(options[key], path) for key, column in paths.items() for path in column if path is not None]
    inputs = [("image", i) for i in args.images] + [("unary", u) for u in args.unary]
    from ._files import check_output_paths

    check_output_paths(every_output, inputs)
    refine._check_distinct(every_output)
    jobs, skipped = [], 0
    for k in range(n):
        outs = {key: paths[key][k] for key in _KINDS if paths[key][k] is not None}
        if args.resume and all(os.path.lexists(p) for p in outs.values()):
            skipped += 1
            continue
        jobs.append((k, args.images[k], args.unary[k], outs))
    check_not_existing([p for _, _, _, outs in jobs for p in outs.values()], args)
    token = uuid.uuid4().hex[:12]
    folders = {p.parent for _, _, _, outs in jobs for p in outs.values()}
    task_args = _task_namespace(args)
    failures = []
    client = make_client(args) if (args.workers or args.scheduler) and jobs else None
    bar = tqdm(total=len(jobs), unit="image", disable=args.no_progress or len(jobs) <= 1, file=sys.stderr,
               dynamic_ncols=True)
    try:
        if client is None:
            results = (refine_one(task_args, job, token) for job in jobs)
        else:
            from distributed import as_completed

            futures = [client.submit(refine_one, task_args, job, token, key=f"cucrf-refine-{token}-{job[0]}",
                                     pure=False) for job in jobs]
            results = (_result(f) for f in as_completed(futures))
        for k, ok, text, caught in results:
            for message, category in caught:
                warnings.warn(message, category, stacklevel=2)
            if ok:
                tqdm.write(text.rstrip("\n"), file=sys.stdout)
            else:
                failures.append((args.images[k], text))
                tqdm.write(f"cucrf: error: {args.images[k]}: {text}", file=sys.stderr)
            bar.update(1)
    finally:
        bar.close()
        if client is not None:
            close_client(client)
        remove_temporaries(folders, token)
    done = len(jobs) - len(failures)
    summary = f"refined {done} of {len(jobs)} image(s)"
    if skipped:
        summary += f"; {skipped} skipped, their outputs exist (--resume)"
    print(summary)
    if failures:
        print(f"cucrf: error: {len(failures)} image(s) failed:", file=sys.stderr)
        for image, text in failures:
            print(f"  {image}: {text}", file=sys.stderr)
        return 1
    return 0


def _result(future):
    """``(index, ok, text, warnings)`` of a finished task; a task that could not run at all is a failure."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - e.g. every worker that tried it died
        index = int(str(future.key).rsplit("-", 1)[1])
        return index, False, error_text(exc), []


def _task_namespace(args) -> argparse.Namespace:
    """``args`` without what only the parent uses (a small, picklable copy for the tasks)."""
    values = dict(vars(args))
    values.pop("func", None)
    return argparse.Namespace(**values)


def refine_one(args, job, token):
    """Refine one image with the single-image ``refine``, writing its outputs atomically.

    Returns ``(index, ok, text, warnings)``: the line ``refine`` printed (with the final paths) or
    the error's one-line message, and the warnings as ``(message, category)`` pairs.
    """
    from . import refine

    k, image, unary, outs = job
    tmps = {key: temporary_path(Path(p), token) for key, p in outs.items()}
    sub = argparse.Namespace(**vars(args))
    sub.images, sub.unary = [image], [unary]
    sub.output, sub.out_dir = [str(tmps["labels"])], None
    for key, option in _OPTION.items():
        setattr(sub, option, [str(tmps[key])] if key in tmps else None)
    sub.workers = sub.scheduler = None
    sub.resume = sub.overwrite = False
    sub.no_progress = True
    stdout = io.StringIO()
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(stdout):
            warnings.simplefilter("always")
            refine.run(sub)
        for key, tmp in tmps.items():
            replace(tmp, Path(outs[key]))
    except Exception as exc:  # noqa: BLE001 - reported with the image, the others go on
        for tmp in tmps.values():
            with contextlib.suppress(OSError):
                tmp.unlink()
        return k, False, error_text(exc), []
    text = stdout.getvalue()
    for key, tmp in tmps.items():
        text = text.replace(str(tmp), str(outs[key]))
    return k, True, text, [(str(w.message), w.category) for w in caught]
