"""Writing checkpoint directories safely: whole or not at all, in bounded memory."""
import contextlib
import json
import os
import secrets
import shutil

import torch
from transformers.utils.hub import convert_file_size_to_int


@contextlib.contextmanager
def atomic_output_dir(out_dir, overwrite: bool = False):
    """Yield a temporary directory next to `out_dir` that becomes `out_dir` only when the block succeeds.

    An existing non-empty `out_dir` is refused unless `overwrite`; on any error nothing is left behind
    and an existing `out_dir` is untouched."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    exists = os.path.exists(out_dir)
    if exists and not overwrite and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = _make_temporary_dir(parent, f".{os.path.basename(out_dir)}.tmp-")
    try:
        yield tmp
        if exists:
            old = tmp + "-old"
            os.rename(out_dir, old)
            os.rename(tmp, out_dir)
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:  # a file (or link) in the output's place
                os.remove(old)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _make_temporary_dir(parent: str, prefix: str) -> str:
    """A new directory in `parent` with the permissions of one made by os.makedirs (the umask's), not
    tempfile.mkdtemp's 0700: it becomes the output directory."""
    for _ in range(100):
        path = os.path.join(parent, prefix + secrets.token_hex(6))
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(f"no unused temporary directory name {prefix}* in {parent}")


class ShardWriter:
    """Collects tensors and writes a safetensors shard whenever `max_shard_size` bytes are pending.

    Memory stays bounded by about one shard. With no limit everything goes to model.safetensors;
    otherwise shards are renamed model-0000i-of-0000n.safetensors with an index at `finish()`."""

    def __init__(self, out_dir: str, max_shard_size=None):
        self.out_dir = out_dir
        # sizes as save_pretrained's max_shard_size reads them ("5GB" = 5e9 bytes, "5GiB" = 5 * 2**30)
        self.limit = None if max_shard_size is None else convert_file_size_to_int(max_shard_size)
        self.pending, self.pending_bytes = {}, 0
        self.written = []  # (temporary file name, keys)
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if self.limit is not None and self.pending and self.pending_bytes + nbytes > self.limit:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self):
        from safetensors.torch import save_file

        fname = f"shard-{len(self.written)}.tmp"
        save_file(self.pending, os.path.join(self.out_dir, fname), metadata={"format": "pt"})
        self.written.append((fname, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def finish(self):
        if self.pending or not self.written:
            self._flush()
        if self.limit is None:
            os.rename(os.path.join(self.out_dir, self.written[0][0]), os.path.join(self.out_dir, "model.safetensors"))
            return
        weight_map = {}
        for i, (tmp_name, keys) in enumerate(self.written):
            fname = f"model-{i + 1:05d}-of-{len(self.written):05d}.safetensors"
            os.rename(os.path.join(self.out_dir, tmp_name), os.path.join(self.out_dir, fname))
            weight_map.update(dict.fromkeys(keys, fname))
        with open(os.path.join(self.out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": self.total}, "weight_map": weight_map}, f, indent=2)
