"""Starting or joining Ray, and the resources the pipeline schedules on.

Inference actors ask for one `inference_core` each and no CPU, so Ray places exactly one actor per
core a node offers to inference while the CPUs stay free for read and preprocessing tasks. (The
stock recipe, actors with num_cpus=1 on every core, takes all CPUs and the reads never run.)
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import socket
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from pipeline.errors import UserError

if TYPE_CHECKING:
    from ray.data import Dataset

INFERENCE_RESOURCE = "inference_core"

# Workers run one thread of numerical work each: the node's cores are shared out by Ray, not by
# OpenMP or BLAS thread pools competing inside every worker.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class ClusterError(UserError):
    """The Ray cluster given by --address cannot be joined; the message says why."""


GCS_CONNECT_TIMEOUT_S = 10


def check_reachable(address: str) -> None:
    """A HOST:PORT address answers a TCP connection: Ray itself retries an address where nothing
    listens for ever, printing a timeout every 40 s."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return  # "auto", or a form Ray reports on itself
    try:
        socket.create_connection((host, int(port)), timeout=GCS_CONNECT_TIMEOUT_S).close()
    except (OSError, OverflowError, ValueError) as exc:
        raise ClusterError(f"cannot join the Ray cluster at {address!r}: nothing answers there "
                           f"({getattr(exc, 'strerror', None) or exc}); start it with `ray start --head` "
                           "or give the head node's address") from None


def local_cores() -> int:
    return len(os.sched_getaffinity(0))


@contextmanager
def environment(variables: dict[str, str]) -> Iterator[None]:
    """VARIABLES set in os.environ for the block only: the driver's own environment, and what its
    later subprocesses inherit, stay the user's."""
    saved = {name: os.environ.get(name) for name in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def init_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Start a local single-node Ray (ADDRESS None) or join a cluster from one of its nodes ("auto",
    "HOST:PORT"). Ray Client (`ray://`) needs the `ray[client]` extra, which is not installed: the
    driver reads input headers and writes the output files itself, so it runs where the data is."""
    import ray
    from ray.data import DataContext

    if not ray.is_initialized():
        common = dict(logging_level=logging.WARNING, log_to_driver=True)
        if address is None:
            # a new local cluster gets token authentication (Ray 2.60's default) and Ray warns on
            # every start that it did; joining a cluster keeps Ray's messages about its settings
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
            cores = num_cpus or local_cores()
            # The local Ray's processes inherit the environment of this process as ray.init starts
            # them: set there, WORKER_ENV reaches every worker without a runtime_env, so the workers
            # Ray starts with the node (one per CPU) serve the run. A job runtime_env would make Ray
            # start new ones instead, seconds of CPU while everything else is starting too.
            with environment(WORKER_ENV):
                ray.init(address="local", num_cpus=cores, resources={INFERENCE_RESOURCE: cores},
                         include_dashboard=False, **common)
        else:
            check_reachable(address)
            try:
                ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, **common)
            except (ConnectionError, ValueError, RuntimeError) as exc:  # nothing there, a bad address, no ray[client]
                raise ClusterError(f"cannot join the Ray cluster at {address!r}: {' '.join(str(exc).split())}") from None
    # registered after Ray's own atexit ray.shutdown (at `import ray`), so it runs before it
    atexit.unregister(_let_ray_shut_down)
    atexit.register(_let_ray_shut_down)
    context = DataContext.get_current()
    context.enable_progress_bars = False  # the CLI draws its own bar over the streamed output
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    # it warns that the progress bars we switched off above are off
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    # an input of fewer read blocks than inference actors (a small folder, --limit) keeps some
    # actors idle; Ray Data's advice to set override_num_blocks is not the user's to follow
    warnings.filterwarnings("ignore", message="The minimum number of concurrent actors", category=UserWarning)


def _let_ray_shut_down() -> None:
    """At exit, before Ray's shutdown: a Ctrl-C then, when the run's work is done and written,
    interrupted the shutdown and Python printed Ray's traceback ("Exception ignored in atexit
    callback"). The first Ctrl-C is ignored; a second one still interrupts a shutdown that hangs."""
    def interrupt_next_time(signum: int, frame: object) -> None:
        signal.signal(signal.SIGINT, signal.default_int_handler)

    signal.signal(signal.SIGINT, interrupt_next_time)


def inference_slots() -> int:
    """How many inference actors the cluster has room for: its `inference_core` resources, or its
    CPUs when the nodes were started without them (then actors share cores with preprocessing)."""
    import ray

    resources = ray.cluster_resources()
    return int(resources.get(INFERENCE_RESOURCE, 0)) or int(resources.get("CPU", 1))


def inference_actor_options() -> dict:
    """Ray options for one inference actor on this cluster.

    Fault tolerance comes from Ray Data's actor pool, which creates its actors with
    max_restarts=-1 and max_task_retries=-1 (Ray 2.60): an actor that dies, with its process or
    its node, is started again wherever an `inference_core` is free and the batches it held are
    sent again. Passing them here would only go through the deprecated `**ray_remote_args`."""
    import ray

    if ray.cluster_resources().get(INFERENCE_RESOURCE):
        return {"num_cpus": 0, "resources": {INFERENCE_RESOURCE: 1}}
    return {"num_cpus": 0, "scheduling_strategy": "SPREAD"}


def map_after_read(dataset: Dataset, fn: Callable, recut_rows: Optional[int] = None, **options) -> Dataset:
    """`dataset.map_batches(fn, **options)` over the rows a read yields, run inside the read tasks;
    or, given RECUT_ROWS (`pipeline.sources.Source`: the reads are too few and too large for the
    cluster), on blocks re-cut to that many rows, in tasks of their own on every CPU.

    Fused, a block goes from reading to preprocessing in one task, on one node, without a second task
    and a trip of the encoded bytes through the object store (and across nodes); on one 2-core node
    the sustained throughput is the same within noise either way. Ray Data fuses consecutive task
    operators only when their Ray options match, and it gives reads its `scheduling_strategy`
    (SPREAD) while map tasks get none at planning (and the same SPREAD when they run): so the fused
    map is given the reads' strategy explicitly. Ray 2.60 has no named parameter for a scheduling
    strategy and warns that passing one this way goes in Ray 2.64 (hence the pin in pyproject.toml)."""
    if recut_rows:
        # a streaming re-cut (no shuffle, no barrier): blocks flow on as the reads yield them
        return dataset.repartition(target_num_rows_per_block=recut_rows).map_batches(fn, **options)
    from ray.data import DataContext

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return dataset.map_batches(fn, scheduling_strategy=DataContext.get_current().scheduling_strategy,
                                   **options)
