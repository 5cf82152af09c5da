"""File output shared by every script: the project folder, atomic writes, and C arrays for generated headers."""
import io
import os
import tempfile
from pathlib import Path

import numpy as np

PROJECT_DIR = Path(__file__).resolve().parent


def atomic_write(path, data):
    """Write bytes or text to a temporary file beside `path`, then rename it into place: a crash or an
    error never leaves half a file, and never clobbers the previous one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + '.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_save(obj, path):
    """torch.save, atomically (see atomic_write)."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


# numpy dtype -> (C type, values per line, format)
C_TYPES = {np.uint32: ('uint32_t', 8, '0x{:08x}'), np.uint16: ('uint16_t', 12, '0x{:04x}'),
           np.int16: ('int16_t', 12, '{:d}'), np.int8: ('int8_t', 16, '{:d}')}


def c_array(name, array):
    """`static const <type> name[n] = {...};` for a generated header, a fixed number of values per line."""
    ctype, per_line, fmt = C_TYPES[array.dtype.type]
    flat = array.flatten()
    lines = [', '.join(fmt.format(int(v)) for v in flat[i:i + per_line]) for i in range(0, len(flat), per_line)]
    return f"static const {ctype} {name}[{len(flat)}] = {{\n    " + ',\n    '.join(lines) + "\n};\n"
