"""Two "nodes" on one machine: two torchrun agents (--nnodes 2 --nproc_per_node 2, c10d rendezvous on 127.0.0.1),
each started from its own copy of the program, as on a cluster without a shared home. Each node downloads HellaSwag
once, by its local rank 0, into its own cache, from a local HTTP server that stands in for GitHub; the 4 ranks log
what one process with 4x the gradient accumulation logs; a SIGTERM to one node stops both, with one checkpoint."""
import hashlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from test_ddp import ARGS, max_diff, read_log

from conftest import HELLASWAG, ROOT

# ARGS without its local HellaSwag file: the nodes download it
NODE_ARGS = ARGS[:ARGS.index("--hellaswag_data")] + ARGS[ARGS.index("--hellaswag_data") + 2:]

LAUNCH = """
import sys
from plumbing import hellaswag_eval  # this node's copy, which downloads HellaSwag for train_gpt2.py
# the local server and the 300-example sample stand in for the official file and its pinned hash
hellaswag_eval.URL, hellaswag_eval.SHA256["val"] = sys.argv[1], sys.argv[2]
import train_gpt2
train_gpt2.main(sys.argv[3:])
"""


@pytest.fixture(scope="module")
def server():
    body, requests = HELLASWAG.read_bytes(), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            for i in range(0, len(body), len(body) // 10 + 1):  # at a network's pace: concurrent downloads overlap
                self.wfile.write(body[i: i + len(body) // 10 + 1])
                self.wfile.flush()
                time.sleep(0.05)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hashlib.sha256(body).hexdigest(), requests
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Two copies of the program, none with a HellaSwag cache."""
    dirs = []
    for i in range(2):
        d = tmp_path_factory.mktemp(f"node{i}")
        for f in ROOT.glob("*.py"):
            shutil.copy(f, d)
        shutil.copytree(ROOT / "plumbing", d / "plumbing", ignore=shutil.ignore_patterns("__pycache__"))
        (d / "launch.py").write_text(LAUNCH)
        dirs.append(d)
    return dirs


def start_nodes(nodes, server, *args):
    """Both nodes' torchrun, writing their console output to one pipe; returns (processes, its read end)."""
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, sha, _ = server
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                               "--node_rank", str(i), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                               "launch.py", url, sha, *map(str, args)],
                              cwd=d, stdout=write, stderr=write, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1", "NO_PROXY": "127.0.0.1"})
             for i, d in enumerate(nodes)]
    os.close(write)
    return procs, os.fdopen(read)


def test_two_nodes_of_two_ranks_log_what_one_process_logs(nodes, server, one_process, small_text, tmp_path):
    procs, out = start_nodes(nodes, server, "--data", small_text, "--log_dir", tmp_path / "four", *NODE_ARGS)
    text = out.read()
    assert [p.wait(timeout=600) for p in procs] == [0, 0], text
    assert "4 ranks x 1 accumulation steps" in text
    assert server[2] == ["/hellaswag_val.jsonl"] * 2  # one download per node
    assert all((d / ".cache" / "hellaswag" / "hellaswag_val.jsonl").read_bytes() == HELLASWAG.read_bytes()
               for d in nodes)
    ref, four = read_log(one_process / "log.txt"), read_log(tmp_path / "four" / "log.txt")
    assert len(ref) == 6 + 4 + 3 and ref.keys() == four.keys()  # train, val and HellaSwag lines
    diff = max_diff(ref, four)
    print(f"max |diff| over {len(ref)} logged values, 1 process vs 2 nodes x 2 ranks: {diff:.2e}")
    assert diff < 1e-4


def test_sigterm_to_one_node_stops_both_with_one_checkpoint(nodes, server, small_text, tmp_path):
    log_dir = tmp_path / "run"
    procs, out = start_nodes(nodes, server, "--data", small_text, "--log_dir", log_dir, *NODE_ARGS,
                             "--checkpoint_every", "0", "--eval_every", "1", "--val_tokens", "8000")
    seen = []
    for line in out:
        seen.append(line)
        if "step     1 | loss" in line:
            procs[1].send_signal(signal.SIGTERM)  # node 1's agent, which passes it to its ranks
            break
    seen.append(out.read())
    text = "".join(seen)
    codes = [p.wait(timeout=300) for p in procs]
    assert all(c != 0 for c in codes), text
    assert "stopped by signal at step" in text
    ckpts = sorted(log_dir.glob("model_*.pt"))
    assert len(ckpts) == 1, text  # written once, by global rank 0, whichever node it is on
    ckpt = torch.load(ckpts[0], weights_only=True)
    assert ckpt["step"] in (2, 3) and len(ckpt["rng"]["ranks"]) == 4
