"""What the study scripts of bench/ share: running named variants side by side in worker processes,
each with its console output in a file, and keeping their results across invocations.

A study script defines `run(name, args) -> dict` (a module-level function, so that spawned workers
can import it) and calls run_variants, which trains only the names not yet in results.json.
"""
import contextlib
import json
import sys
import traceback
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def quietly(log_file, function, *arguments):
    """function(*arguments) with its console output, and the traceback of what it raises, sent to log_file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, 'w') as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return function(*arguments)
        except BaseException:
            traceback.print_exc()
            raise


def run_variants(run, names, args, order, summary):
    """Results of `names` (dicts with a 'name', and an 'error' for a failed run), in that order.

    Names already in <args.out>/results.json without an error are taken from it; the others run as
    run(name, args), args.jobs at a time in spawned processes. results.json is rewritten after
    every run with everything known so far, in the order of `order`; summary(result) is printed
    for each new result.
    """
    results_file = Path(args.out) / 'results.json'
    results_file.parent.mkdir(parents=True, exist_ok=True)
    done = {result['name']: result for result in json.loads(results_file.read_text())} if results_file.is_file() else {}
    todo = [name for name in names if name not in done or 'error' in done[name]]
    print(f'{len(todo)} run(s) to do, {len(names) - len(todo)} already in {results_file}', flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context('spawn')) as pool:
        futures = {name: pool.submit(run, name, args) for name in todo}
        for name, future in futures.items():
            done[name] = future.result()
            print(f'{name}: {done[name].get("error") or summary(done[name])}', flush=True)
            known = [key for key in order if key in done] + [key for key in done if key not in order]
            results_file.write_text(json.dumps([done[key] for key in known], indent=1))
    return [done[name] for name in names]


def publish(report, out=None):
    """Print a Markdown report and, with `out`, also write it to that file (its folder made)."""
    print('\n' + report)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(report + '\n')


def device_label(args):
    """Where the runs went, for a table's setting line."""
    import torch
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f'CPU, {args.threads} thread(s) per job'
    return f'{device}, {args.jobs} job(s) at once'
