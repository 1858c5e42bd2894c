#!/usr/bin/env python3
# GPU benchmark for machines without Node.js (the borrowed GPU machine): model load through two rpc-servers
# with and without SET_TENSOR_GGUF (time to /health 200, bytes over loopback), and tokens/s with llama-bench
# solo, split across local GPUs, and through two rpc-servers. Prints markdown tables (and writes them to --md).
#
#   python3 native/tools/gpu-bench.py --bin native/build/mesh/build/bin --model m.gguf --md out.md
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def lo_bytes() -> int:
    """Bytes received on the loopback interface: everything llama-server sends to local rpc-servers."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])
    raise RuntimeError("no loopback interface in /proc/net/dev")


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def rpc_hello(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
        s.sendall(bytes([14]) + (24).to_bytes(8, "little") + bytes(24))
        got = b""
        while len(got) < 8 + 28:
            chunk = s.recv(64)
            if not chunk:
                raise ConnectionError("closed")
            got += chunk
        return got[8:8 + 28]


class Proc:
    def __init__(self, argv, env_extra, log):
        env = dict(os.environ, GGML_RPC_NO_RDMA="1", **env_extra)
        self.log = open(log, "w")
        # restore_signals=False: the child keeps Python's ignored SIGPIPE (an rpc-server otherwise dies of
        # SIGPIPE when a client disconnects mid-write)
        self.p = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT, restore_signals=False,
                                  start_new_session=True)
        self.logpath = log

    def stop(self):
        if self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.p.pid, signal.SIGKILL)
                self.p.wait()
        self.log.close()

    def tail(self, n=30) -> str:
        with open(self.logpath, errors="replace") as f:
            return "".join(f.readlines()[-n:])


def start_rpc(binary, gpu, model, logdir, tag) -> tuple:
    port = free_port()
    env = {} if gpu is None else {"CUDA_VISIBLE_DEVICES": str(gpu)}
    p = Proc([binary, "-H", "127.0.0.1", "-p", str(port), "--gguf", model], env, os.path.join(logdir, f"rpc-{tag}.log"))
    deadline = time.time() + 60
    while True:
        if p.p.poll() is not None:
            raise RuntimeError(f"rpc-server exited: {p.tail()}")
        try:
            caps = rpc_hello(port)
            return p, port, caps
        except OSError:
            if time.time() > deadline:
                p.stop()
                raise RuntimeError(f"rpc-server did not answer: {p.tail()}")
            time.sleep(0.05)


def load_llama_server(binary, model, rpc_ports, env, logdir, tag, devices=None) -> tuple:
    port = free_port()
    argv = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-c", "4096", "-ngl", "999",
            "-np", "1", "--cache-ram", "0", "-lm", "none"]
    if rpc_ports:
        argv += ["--rpc", ",".join(f"127.0.0.1:{p}" for p in rpc_ports), "-dev", ",".join(f"RPC{i}" for i in range(len(rpc_ports)))]
    elif devices:
        argv += ["-dev", devices]
    before = lo_bytes()
    t0 = time.perf_counter()
    p = Proc(argv, env, os.path.join(logdir, f"llama-{tag}.log"))
    try:
        while True:
            if p.p.poll() is not None:
                raise RuntimeError(f"llama-server exited: {p.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > 300:
                raise RuntimeError(f"llama-server not healthy after 300 s: {p.tail()}")
            time.sleep(0.02)
        secs = time.perf_counter() - t0
        loaded = lo_bytes() - before
        # greedy tokens, to check that every mode computes the same thing
        body = json.dumps({"prompt": "Once upon a time, in a land far away,", "n_predict": 32, "temperature": 0, "top_k": 1,
                           "cache_prompt": False, "return_tokens": True, "ignore_eos": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            tokens = json.loads(r.read())["tokens"]
        return secs, loaded, tokens
    finally:
        p.stop()


def llama_bench(binary, model, extra, env, logdir, tag) -> dict:
    argv = [binary, "-m", model, "-p", "512", "-n", "128", "-r", "3", "-ngl", "99", "-o", "json"] + extra
    r = subprocess.run(argv, env=dict(os.environ, GGML_RPC_NO_RDMA="1", **env), capture_output=True, text=True, timeout=600)
    with open(os.path.join(logdir, f"bench-{tag}.log"), "w") as f:
        f.write(r.stderr)
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench {tag} failed: {r.stderr[-2000:]}")
    out = {}
    for row in json.loads(r.stdout):
        test = f"pp{row['n_prompt']}" if row["n_prompt"] > 0 else f"tg{row['n_gen']}"
        out[test] = (row["avg_ts"], row["stddev_ts"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--md", required=True)
    ap.add_argument("--logdir", default="/tmp/gpu-bench-logs")
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    os.makedirs(a.logdir, exist_ok=True)
    rpc_bin = os.path.join(a.bin, "ggml-rpc-server")
    srv_bin = os.path.join(a.bin, "llama-server")
    bench_bin = os.path.join(a.bin, "llama-bench")
    gpus = [l for l in subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.splitlines() if l.startswith("GPU ")]
    n_gpu = len(gpus)
    # two rpc-servers: one per GPU when there are two, else both on the one GPU
    rpc_gpus = [0, 1] if n_gpu >= 2 else [0, 0]
    lines = []

    def emit(s=""):
        print(s, flush=True)
        lines.append(s)

    size = os.path.getsize(a.model)
    emit(f"## GPU: {n_gpu} x {gpus[0].split(':', 1)[1].split('(')[0].strip() if gpus else '?'}")
    emit()
    emit(f"model: {os.path.basename(a.model)} ({size / 1048576:.0f} MiB); rpc-servers on GPU(s) {rpc_gpus}, "
         f"all layers forced through them (`-dev RPC0,RPC1`), loopback TCP")
    emit()

    # Load, alternating modes; each mode gets fresh rpc-servers (their buffers are freed when a client leaves,
    # but fresh processes keep the runs alike).
    loads = {"solo": [], "bytes": [], "gguf": []}
    for rep in range(a.reps):
        loads["solo"].append(load_llama_server(srv_bin, a.model, [], {}, a.logdir, f"solo{rep}", devices="CUDA0"))
        for mode in ("bytes", "gguf"):
            procs = []
            try:
                ports = []
                for i, g in enumerate(rpc_gpus):
                    p, port, caps = start_rpc(rpc_bin, g, a.model, a.logdir, f"{mode}{rep}-{i}")
                    procs.append(p)
                    ports.append(port)
                env = {"GGML_RPC_NO_GGUF": "1"} if mode == "bytes" else {}
                loads[mode].append(load_llama_server(srv_bin, a.model, ports, env, a.logdir, f"{mode}{rep}"))
            finally:
                for p in procs:
                    p.stop()
        print(f"load rep {rep}: {loads}", file=sys.stderr, flush=True)

    emit(f"### Model load (spawn to /health 200, median of {a.reps}; bytes = loopback traffic during the load)")
    emit()
    emit("| mode | load s | MiB over loopback | % of model |")
    emit("|---|---:|---:|---:|")
    label = {"solo": "solo llama-server on one local GPU (no RPC)", "bytes": "two rpc-servers, weights sent as bytes (`GGML_RPC_NO_GGUF=1`)",
             "gguf": "two rpc-servers, weights from their own GGUF (`--gguf`)"}
    med = {}
    for mode in ("solo", "bytes", "gguf"):
        s = statistics.median(x[0] for x in loads[mode])
        b = statistics.median(x[1] for x in loads[mode])
        med[mode] = (s, b)
        emit(f"| {label[mode]} | {s:.2f} | {b / 1048576:.1f} | {100 * b / size:.2f} |")
    emit()
    emit(f"load time ratio gguf/bytes = {med['gguf'][0] / med['bytes'][0]:.2f}; bytes ratio = {med['bytes'][1] / max(1, med['gguf'][1]):.0f}x")
    emit()
    ref = loads["solo"][0][2]
    same = all(x[2] == ref for m in loads for x in loads[m])
    emit(f"greedy tokens (32, after each load): {'identical in every run and mode' if same else 'DIFFER between runs/modes'}; "
         f"{len(set(ref))} distinct ids in the solo run")
    if not same:
        for m in loads:
            emit(f"  {m}: {[x[2] for x in loads[m]]}")
    emit()

    # Throughput
    results = {}
    results["solo (CUDA0)"] = llama_bench(bench_bin, a.model, ["-dev", "CUDA0"], {}, a.logdir, "solo")
    if n_gpu >= 2:
        results["two local GPUs, split by layer"] = llama_bench(bench_bin, a.model, ["-dev", "CUDA0/CUDA1", "-ts", "1/1"], {}, a.logdir, "two-gpus")
    procs = []
    try:
        ports = []
        for i, g in enumerate(rpc_gpus):
            p, port, _ = start_rpc(rpc_bin, g, a.model, a.logdir, f"bench-{i}")
            procs.append(p)
            ports.append(port)
        rpc = ",".join(f"127.0.0.1:{p}" for p in ports)
        results["one rpc-server (all layers)"] = llama_bench(bench_bin, a.model, ["--rpc", rpc.split(",")[0], "-dev", "RPC0"], {}, a.logdir, "rpc1")
        results["two rpc-servers, split 1:1"] = llama_bench(bench_bin, a.model, ["--rpc", rpc, "-dev", "RPC0/RPC1", "-ts", "1/1"], {}, a.logdir, "rpc2")
    finally:
        for p in procs:
            p.stop()
    emit("### Tokens/s (llama-bench -p 512 -n 128 -r 3, defaults otherwise)")
    emit()
    emit("| setup | pp512 tok/s | tg128 tok/s | tg128 vs solo |")
    emit("|---|---:|---:|---:|")
    solo_tg = results["solo (CUDA0)"]["tg128"][0]
    for k, v in results.items():
        emit(f"| {k} | {v['pp512'][0]:.0f} ± {v['pp512'][1]:.0f} | {v['tg128'][0]:.1f} ± {v['tg128'][1]:.1f} | {v['tg128'][0] / solo_tg:.2f} |")
    emit()
    with open(a.md, "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
