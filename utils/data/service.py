"""Training input on other machines: the pipelines run on tf.data service workers (run.data_service).

  python -m utils.data.service dispatcher --port=5050 --workers=HOST1:5051,HOST2:5051
  python -m utils.data.service worker --dispatcher=DISPATCHER_HOST:5050 --port=5051   (on HOST1, HOST2)

docs/running.md (Input on other machines: tf.data service) says how to run them. Every replica receives exactly
the batches it receives without the service, so a run with it is the run without it, and resumes the same:

  * The index plan travels as data. A worker cannot call back into the trainer's Python, so the dataset sent
    to it is the pipeline built under sampling.indices_in_graph: the plan of a chunk of STEPS_PER_CHUNK steps
    as constants. The trainer registers one dataset per chunk and reads the chunks in turn, starting the next
    chunk's job while it reads the current one; no chunk holds the whole run's plan.
  * Static sharding by step. Worker i of the dispatcher's W workers (--workers, in that order) builds steps
    i, i + W, ... of every chunk (ShardingPolicy.HINT at the plan's source): each step is built whole by
    one worker, none twice. Dynamic sharding would split the pipeline's several index sources (images,
    supports, labels) independently, and ShardingPolicy.OFF has every worker build everything. TensorFlow
    refuses a hint-sharded source of fewer rows than workers, so a chunk's source is padded to
    STEPS_PER_CHUNK rows (the padding is dropped before anything is built): at most that many workers.
  * Order restored on the trainer. Elements of different workers arrive in any order, so each carries its
    position in the stream (step x replicas fed + replica) and the trainer puts them back in order: it holds
    the elements that arrive early, at most a chunk's worth when one worker lags behind the other.
  * One job per input pipeline: each trainer worker (its replicas, sampling.replicas_for) reads its own
    datasets, in the order sampling.round_robin gives them to its devices.
"""

import argparse
from collections.abc import Callable, Iterator
import concurrent.futures
import socket
import sys

import tensorflow as tf

from utils.data import sampling
from utils.errors import UserError

_SERVICE = tf.data.experimental.service

# Steps of the plan in one registered dataset. ImageNet (4096 images + 6720 supports a step, int64): 87 MB a
# chunk, and a chunk's elements are what the trainer may hold out of order.
STEPS_PER_CHUNK = 1000

# Ops that call back into the process that built the dataset: they cannot run on a worker.
_PYTHON_OPS = frozenset({"PyFunc", "PyFuncStateless", "EagerPyFunc"})


def python_ops(dataset: tf.data.Dataset) -> set[str]:
  """The ops of the dataset's graph (its functions included) that call Python."""
  graph = tf.compat.v1.GraphDef.FromString(dataset._as_serialized_graph().numpy())  # pylint: disable=protected-access
  ops = {node.op for node in graph.node}
  ops |= {node.op for function in graph.library.function for node in function.node_def}
  return ops & _PYTHON_OPS


def _check_reachable(address: str, timeout: float = 10.0) -> None:
  """Raises UserError when nothing accepts a connection at the dispatcher's address (TensorFlow would retry forever)."""
  host, port = address.removeprefix("grpc://").rsplit(":", 1)
  try:
    socket.create_connection((host, int(port)), timeout=timeout).close()
  except OSError as error:
    raise UserError(
      f"run.data_service: no tf.data service dispatcher answers at {address} ({error}); start one "
      "(python -m utils.data.service dispatcher, docs/running.md) or set run.data_service=''"
    ) from None


def _chunks(start_step: int, total_steps: int, size: int) -> list[tuple[int, int]]:
  """[first, stop) of each chunk of steps from start_step, cut at multiples of `size`."""
  edges = [start_step, *range((start_step // size + 1) * size, total_steps, size), total_steps]
  return [(first, stop) for first, stop in zip(edges, edges[1:]) if first < stop]


def remote_dataset(
  address: str,
  make_dataset: Callable[[sampling.Replicas, int], tf.data.Dataset],
  replicas: sampling.Replicas,
  start_step: int,
  total_steps: int,
  steps_per_chunk: int = STEPS_PER_CHUNK,
) -> tf.data.Dataset:
  """make_dataset(replicas, start_step)'s elements, built on the workers of the dispatcher at `address`.

  Args:
    address: the dispatcher, grpc://HOST:PORT (run.data_service).
    make_dataset: (replicas, start step) -> the pipeline for steps [start step, total_steps), as the stage's.
    replicas: the replicas this trainer's input pipeline feeds.
    start_step, total_steps: the steps to deliver.
    steps_per_chunk: steps of the plan in one registered dataset.
  Returns:
    A dataset with the same elements in the same order as make_dataset(replicas, start_step).
  Raises:
    UserError: the pipeline calls Python (TFRecord files are read that way), so no worker can run it; or
      nothing answers at `address`.
  """
  per_step = len(replicas.ids)
  chunks = _chunks(start_step, total_steps, steps_per_chunk)

  def chunk_dataset(first, stop):
    """The chunk's steps as the workers build them: (position in the stream, element)."""
    with sampling.indices_in_graph(stop, steps_per_chunk):
      dataset = make_dataset(replicas, first)
    # The position of each element, sharded by step as the plan is: the same step, the same worker.
    positions = sampling.padded_steps(first, stop, steps_per_chunk).flat_map(
      lambda step: tf.data.Dataset.range(step * per_step, (step + 1) * per_step)
    )
    return tf.data.Dataset.zip(positions, dataset)

  if not chunks:
    return make_dataset(replicas, start_step)  # no steps left
  # Built once here (building a streamed pipeline takes seconds): its ops checked before anything is sent,
  # its element spec the stream's.
  first_chunk = chunk_dataset(*chunks[0])
  calls = python_ops(first_chunk)
  if calls:
    raise UserError(
      f"run.data_service: this input calls Python ({', '.join(sorted(calls))}), which tf.data service "
      "workers cannot run (TFRecord files are read that way); use image folders or run.data_service=''"
    )

  _check_reachable(address)

  def start_job(tagged):
    """Registers a chunk's dataset and starts reading it: an iterator of (position, element)."""
    dataset_id = _SERVICE.register_dataset(address, tagged)
    remote = _SERVICE.from_dataset_id(
      processing_mode=_SERVICE.ShardingPolicy.HINT,
      service=address,
      dataset_id=dataset_id,
      element_spec=tagged.element_spec,
    )
    return iter(remote)

  def in_order() -> Iterator:
    # The next chunk is built, registered and started in the background while this one is read.
    background = concurrent.futures.ThreadPoolExecutor(1)
    try:
      upcoming = background.submit(start_job, first_chunk)
      for index, (first, stop) in enumerate(chunks):
        current = upcoming.result()
        if index + 1 < len(chunks):
          upcoming = background.submit(lambda chunk=chunks[index + 1]: start_job(chunk_dataset(*chunk)))
        expected, early = first * per_step, {}
        for position, element in current:
          early[int(position)] = element
          while expected in early:
            yield tf.nest.map_structure(lambda tensor: tensor.numpy(), early.pop(expected))
            expected += 1
        if expected != stop * per_step:
          raise RuntimeError(f"the tf.data service delivered steps {first}..{stop - 1} incompletely: {sorted(early)}")
    finally:
      background.shutdown(wait=False)

  element_spec = first_chunk.element_spec[1]
  return tf.data.Dataset.from_generator(in_order, output_signature=element_spec).prefetch(tf.data.AUTOTUNE)


# --- The servers ---------------------------------------------------------------------------------------------


def start_dispatcher(port: int, workers: list[str], work_dir: str = "") -> _SERVICE.DispatchServer:
  """A dispatcher on `port` for the workers at `workers` (HOST:PORT each, in a fixed order: static sharding).

  work_dir: where it keeps the registered datasets and its journal (a restarted dispatcher resumes); empty:
  in memory.
  """
  config = _SERVICE.DispatcherConfig(
    port=port, worker_addresses=list(workers), work_dir=work_dir or None, fault_tolerant_mode=bool(work_dir)
  )
  return _SERVICE.DispatchServer(config)


# A worker learns of a new job (each chunk is one) at its next heartbeat; TensorFlow's default is 30 s.
HEARTBEAT_MS = 1000


def start_worker(
  dispatcher: str, port: int, address: str = "", heartbeat_ms: int = HEARTBEAT_MS
) -> _SERVICE.WorkerServer:
  """A worker on `port` serving the dispatcher at `dispatcher` (HOST:PORT).

  address: HOST:PORT the trainers reach this worker at, as listed in the dispatcher's workers (default:
  this machine's name and `port`).
  """
  config = _SERVICE.WorkerConfig(
    dispatcher_address=dispatcher,
    worker_address=address or f"{socket.gethostname()}:{port}",
    port=port,
    heartbeat_interval_ms=heartbeat_ms,
  )
  return _SERVICE.WorkerServer(config)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
    prog="python -m utils.data.service",
    description="tf.data service servers for run.data_service (docs/running.md, Input on other machines). "
    "They need no GPU; every worker must read the image files at the paths the trainer uses.",
  )
  roles = parser.add_subparsers(dest="role", required=True)
  dispatcher = roles.add_parser("dispatcher", help="the one dispatcher; trainers use --config.run.data_service")
  dispatcher.add_argument("--port", type=int, default=5050, help="port to serve on (default 5050)")
  dispatcher.add_argument(
    "--workers",
    required=True,
    help="HOST:PORT of every worker, comma-separated, each as its worker's --address; worker i of W builds "
    "steps i, i + W, ...",
  )
  dispatcher.add_argument(
    "--work_dir", default="", help="folder for the registered datasets and the journal (default: in memory)"
  )
  worker = roles.add_parser("worker", help="one worker; start one per machine that builds input")
  worker.add_argument("--dispatcher", required=True, help="the dispatcher's HOST:PORT")
  worker.add_argument("--port", type=int, default=5051, help="port to serve on (default 5051)")
  worker.add_argument(
    "--address", default="", help="HOST:PORT as in the dispatcher's --workers (default: this host's name:PORT)"
  )
  args = parser.parse_args(argv)
  if args.role == "dispatcher":
    server = start_dispatcher(args.port, [w for w in args.workers.split(",") if w], args.work_dir)
    print(f"dispatcher at grpc://{socket.gethostname()}:{args.port}: --config.run.data_service=grpc://HOST:{args.port}")
  else:
    server = start_worker(args.dispatcher, args.port, args.address)
  sys.stdout.flush()
  server.join()


if __name__ == "__main__":
  main()
