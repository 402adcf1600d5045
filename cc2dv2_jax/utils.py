"""Small helpers with no JAX dependency (safe in grain worker processes)."""
import os
import sys
import time


def progress(iterable, total=None, desc="", every_s=2.0, stream=None):
  """Yields from `iterable`, printing 'desc: i/total (pct) rate eta' to stderr at most every `every_s`.

  A plain line printer rather than tqdm: it works in logs of batch jobs (no carriage-return
  redraws when stderr is not a terminal) and adds no dependency.
  """
  stream = stream or sys.stderr
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)
  tty = hasattr(stream, "isatty") and stream.isatty()
  quiet = os.environ.get("CC2D_QUIET_PROGRESS") == "1"
  t0 = last = time.time()
  i = 0

  def show(final=False):
    elapsed = time.time() - t0
    rate = i / elapsed if elapsed > 0 else 0.0
    if total:
      eta = (total - i) / rate if rate > 0 else float("nan")
      text = f"{desc}: {i}/{total} ({100.0 * i / total:.0f}%) {rate:.1f}/s eta {eta:.0f}s"
    else:
      text = f"{desc}: {i} {rate:.1f}/s"
    end = "\n" if (final or not tty) else "\r"
    stream.write(("\r" if tty else "") + text + end)
    stream.flush()

  for item in iterable:
    yield item
    i += 1
    now = time.time()
    if not quiet and now - last >= every_s:
      last = now
      show()
  if not quiet:
    show(final=True)


def atomic_write_text(path, text):
  """Writes `text` to `path` through a temporary file, so readers never see half a file."""
  path = os.fspath(path)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)
