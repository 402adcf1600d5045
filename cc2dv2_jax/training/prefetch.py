"""Device prefetch: the next batches are copied to the device while the current step runs.

`device_prefetch(batches, mesh)` wraps a host iterator of numpy dicts (a grain iterator, or
tpl.ProcessSlice) and yields the same dicts with their arrays already placed on `mesh` (sharded on
the leading axis, as `sharding.put_batch`), except the host-only keys ("index": the image rows the
training loop keeps to name a batch that went non-finite), which stay numpy.

Why: `jax.device_put` / `make_array_from_process_local_data` return at once and copy in the
background, so a batch put on the device one step ahead arrives while the step before it computes;
the step then never waits for its input. Together with asynchronous dispatch, the host only has
to produce and enqueue one batch per step faster than the device runs one.

Checkpoints: the wrapper reads `size` batches ahead, so the underlying iterator's state is ahead
of what was consumed. `get_state()` returns the state recorded right after the last batch that
was handed out, and `set_state()` drops the buffer, so a resumed run sees exactly the batches an
unbroken run would have seen.
"""
import collections

from cc2dv2_jax import sharding

HOST_KEYS = ("index",)


class DevicePrefetch:
  """Iterator over device-resident batches, `size` of them in flight (see the module docstring).

  Args:
    iterator: yields dicts of numpy arrays with a leading batch axis (this process's rows).
    mesh: the mesh the train step runs on.
    size: batches on the device ahead of the consumer (2 = double buffering).
    host_keys: keys left on the host as numpy.
  """

  def __init__(self, iterator, mesh, size=2, host_keys=HOST_KEYS):
    if size < 1:
      raise ValueError(f"prefetch size must be >= 1, got {size}")
    self._it = iterator
    self._mesh = mesh
    self._size = size
    self._host_keys = tuple(host_keys)
    self._queue = collections.deque()  # (iterator state after this batch, batch on device)
    self._done = False
    self._error = None  # raised by a read-ahead; re-raised when the caller asks for that batch
    self._has_state = hasattr(iterator, "get_state")
    self._consumed_state = iterator.get_state() if self._has_state else None

  def __iter__(self):
    return self

  def _put(self, host_batch):
    host = {k: v for k, v in host_batch.items() if k in self._host_keys}
    dev = sharding.put_batch({k: v for k, v in host_batch.items() if k not in self._host_keys},
                             self._mesh)
    return {**dev, **host}

  def _fill(self):
    while not self._done and self._error is None and len(self._queue) < self._size:
      try:
        host_batch = next(self._it)
      except StopIteration:
        self._done = True
        break
      state = self._it.get_state() if self._has_state else None
      self._queue.append((state, self._put(host_batch)))

  def __next__(self):
    if not self._queue:
      if self._error is not None:
        error, self._error = self._error, None
        raise error
      self._fill()  # a failure here loses nothing: no batch was handed out
      if not self._queue:
        raise StopIteration
    state, batch = self._queue.popleft()
    self._consumed_state = state
    # Start the next copy now, before the caller dispatches its step on `batch`. A failing
    # read-ahead (e.g. data workers stopped by SIGTERM) must not lose the batches already read,
    # which get_state() will count as consumed: they are handed out first, then it is raised.
    try:
      self._fill()
    except Exception as e:  # pylint: disable=broad-except
      self._error = e
    return batch

  def get_state(self):
    """The wrapped iterator's state just after the last batch returned by `next`."""
    if not self._has_state:
      raise AttributeError(f"{type(self._it).__name__} has no get_state(): cannot checkpoint")
    return self._consumed_state

  def set_state(self, state):
    """Restores the wrapped iterator and drops the batches read ahead."""
    self._it.set_state(state)
    self._queue.clear()
    self._done = False
    self._error = None
    self._consumed_state = state


def device_prefetch(iterator, mesh, size=2, host_keys=HOST_KEYS):
  """`DevicePrefetch(iterator, mesh, size, host_keys)`: batches put on the device `size` ahead."""
  return DevicePrefetch(iterator, mesh, size=size, host_keys=host_keys)
