"""File output shared by every script: the project folder, atomic writes, and C arrays for generated headers."""
import io
import os
import stat
import tempfile
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent


class OutputError(ValueError):
    """An output cannot be written safely; the message names the path, the reason and what would work."""


def read_bounded(path, limit, what, error, head=False):
    """The bytes of a regular file of at most `limit` bytes (head: its first `limit` bytes, whatever its size); a
    device, a pipe or a larger file raises error(message) instead of being read without end. OSError (missing, a
    directory, no permission) passes."""
    path = Path(path)
    with open(path, 'rb') as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise error(f"{what} {path} is not a regular file; give the path of a file")
        data = f.read(limit + (not head))
    if len(data) > limit:
        raise error(f"{what} {path} is larger than {limit:,} bytes, more than any {what} holds; give the right file")
    return data


def read_or_explain(path, limit, what, error, missing, head=False):
    """read_bounded, with every way the file can be unreadable raised as error(message); `missing` says how to
    make the file."""
    try:
        return read_bounded(path, limit, what, error, head)
    except FileNotFoundError:
        raise error(f"{path} is missing: {missing}") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory; give the {what} file") from None
    except OSError as e:
        raise error(f"{what} {path} cannot be read: {e.strerror}") from None


def _same_file(a, b):
    try:
        return os.path.samefile(a, b)
    except OSError:   # one does not exist (yet): the same path, links followed
        return Path(a).resolve() == Path(b).resolve()


def refuse_overwriting_inputs(outputs, inputs):
    """outputs and inputs: {option: path}. An output that is one of the command's inputs (or another output)
    is refused before anything is written: the command would destroy what it reads."""
    inputs = {flag: path for flag, path in inputs.items() if path is not None}
    outputs = [(flag, path) for flag, path in outputs.items() if path is not None]
    for i, (flag, path) in enumerate(outputs):
        for other, source in list(inputs.items()) + outputs[:i]:
            if _same_file(path, source):
                raise OutputError(f"{flag} {path} is the file of {other}; writing it would replace that file: "
                                  f"give {flag} another path")


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(target):
    """Temporary files of earlier writes to `target` whose process is gone (killed mid-write)."""
    for tmp in target.parent.glob(f'.{target.name}.*.tmp'):
        pid = tmp.name[len(target.name) + 2:].split('.')[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def atomic_write(path, data):
    """Write bytes or text to `path` so that a crash or an error never leaves half a file: into a temporary
    file beside it, renamed into place. A symlink is written through (its target is replaced, the link
    stays); a device or a pipe is written plainly (never replaced by a file); a directory or a read-only
    file is refused. A new file gets its mode from the umask, a replaced one keeps its mode."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    try:
        target = path.resolve() if path.is_symlink() else path
    except (RuntimeError, OSError) as e:
        raise OutputError(f"cannot write {path}: the symlink cannot be followed ({e})") from None
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise OutputError(f"{path} is a directory; give the path of a file to write")
    if st is not None and not stat.S_ISREG(st.st_mode):
        try:
            with open(target, 'wb') as f:
                f.write(data)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror}") from None
        return
    if st is not None and not st.st_mode & 0o222:
        raise OutputError(f"{path} is read-only (mode {stat.S_IMODE(st.st_mode):04o}); make it writable "
                          "(chmod u+w) or write elsewhere")
    mode = stat.S_IMODE(st.st_mode) if st is not None else 0o666 & ~_umask()
    parent = target.parent
    existing = next(folder for folder in [parent, *parent.parents] if folder.exists())
    if not os.stat(existing).st_mode & 0o222:   # by its mode, which even root does not override here
        raise OutputError(f"cannot write {path}: the folder {existing} is read-only; make it writable or "
                          "write elsewhere")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(target)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f'.{target.name}.{os.getpid()}.', suffix='.tmp')
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror} (in {parent})") from None
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, target)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write {path}: {e.strerror}") from None
        raise


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


# numpy dtype -> (C type, values per line, format)
C_TYPES = {np.uint32: ('uint32_t', 8, '0x{:08x}'), np.uint16: ('uint16_t', 12, '0x{:04x}'),
           np.int16: ('int16_t', 12, '{:d}'), np.int8: ('int8_t', 16, '{:d}'), np.uint8: ('uint8_t', 16, '{:d}')}


def c_array(name, array):
    """`static const <type> name[n] = {...};` for a generated header, a fixed number of values per line."""
    ctype, per_line, fmt = C_TYPES[array.dtype.type]
    flat = array.flatten()
    lines = [', '.join(fmt.format(int(v)) for v in flat[i:i + per_line]) for i in range(0, len(flat), per_line)]
    return f"static const {ctype} {name}[{len(flat)}] = {{\n    " + ',\n    '.join(lines) + "\n};\n"
