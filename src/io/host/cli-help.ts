// The `mesh-inference --help` text, with the defaults and environment variable names it quotes.
import { LOG_LEVELS } from './logger.ts';

export const DEFAULT_API_PORT = 9337;
/** Environment variables read for services, where flags end up in `ps` output or unit files. */
export const JOIN_ENV = 'MESH_INFERENCE_JOIN';
export const API_KEY_ENV = 'MESH_INFERENCE_API_KEY';

export const HELP_TEXT = `mesh-inference: pool the GPUs (or CPUs) of several machines into one OpenAI-compatible LLM API.

Usage: mesh-inference [options]
       mesh-inference invite [--ttl 24h] [--key-file PATH]
       mesh-inference rotate [--remove ID|NAME]... [--key-file PATH] [--port N]
       mesh-inference plan --model PATH [--join TOKEN] [--max-vram SIZE] [--ctx-size N] ... [--json]
       mesh-inference inspector [--port 8080]

  --model PATH          GGUF model file on this machine (every serving node needs its own copy)
  --join TOKEN          join the mesh of this invite token (repeatable; also $${JOIN_ENV},
                        several tokens separated by whitespace or commas): an mi2 token from
                        \`mesh-inference invite\` expires; an mi1 token carries the mesh secret forever
  --join-file PATH      read invite tokens from a file, one per line ('#' starts a comment)
  --show-secret-token   also print this mesh's mi1 token at start (it carries the mesh secret and
                        never expires: whoever sees it joins until \`mesh-inference rotate\`)
  --role ROLE           auto | host | worker | client (default auto: may host or work)
  --client              short for --role client: a lite client with no model, it only proxies the API
  --port N              API port (default ${DEFAULT_API_PORT}; 0 picks a free one)
  --listen-all          serve the API on every interface instead of 127.0.0.1 (use --api-key too)
  --api-key KEY         require "Authorization: Bearer KEY" on every API route but /health
                        (also $${API_KEY_ENV})
  --allowed-host NAME   also answer requests whose Host header names NAME (repeatable); the API
                        answers only loopback names and the addresses it listens on, and refuses
                        others with 421 (a web page must not reach it by DNS rebinding)
  --bind-port N         fixed port for the mesh, so a router's port-forwarding rule can reach it:
                        forward UDP (QUIC) and TCP (the direct data path) on this port
  --data-port N         TCP port of the direct data path (default: the --bind-port number when
                        given, else any free port)
  --data-path MODE      auto (default: a direct TCP + TLS connection between two nodes where one can
                        reach the other, else QUIC) | quic (never use TCP)
  --max-vram SIZE       memory this node offers to the mesh, e.g. 8G, 512MiB, 24GB (default: detected)
  --ctx-size N          tokens of context per request when this node hosts (default 4096, or
                        $MESH_INFERENCE_CTX; 32k works); a plan must hold 1.1 x the model plus the
                        host's KV cache: layers x KV heads x head dims x ctx x slots x bytes of the type
  --parallel N          requests served at once (slots), each with --ctx-size tokens (default 1)
  --flash-attn MODE     off (default: split output equals solo output on CPUs) | on | auto
  --cache-type TYPE     KV cache type, K and V: f16 (default), f32, bf16, q8_0, q5_1, q5_0, q4_1,
                        q4_0, iq4_nl (quantized types need --flash-attn on)
  --name NAME           name shown to the other nodes (default: the host name)
  --relay MODE          default (iroh's public relays) | none (LAN and tests) | a relay URL
  --stun HOST:PORT      STUN server for the public address (repeatable; "none" to skip)
  --key-file PATH       where this node's secret key lives (default: in the user's config directory);
                        next to it, PATH.mesh.json remembers the mesh (id, secret, known peers), so the
                        same command line rejoins it after a restart
  --new-mesh            start a fresh mesh instead of rejoining the remembered one
  --log-level LEVEL     ${LOG_LEVELS.join(' | ')} (default info)
  --inspect [URL]       send the live state machines to the Stately inspector (online: its link is
                        printed once connected), or to the WebSocket inspector at URL (ws://...);
                        offline: run \`mesh-inference inspector\` and pass --inspect ws://127.0.0.1:8080
  -h, --help            this text

\`mesh-inference invite\` prints an expiring invite (mi2) for the mesh this key file's node belongs to
(read from PATH.mesh.json; no running node needed): it carries no mesh secret, and after --ttl (default
24h; e.g. 30m, 2h, 7d) its inviter refuses it. The node that made it must be running to admit the joiner.

\`mesh-inference rotate\` asks the node running here (its API on --port, signed with its key file) to
give the mesh a new secret, sent to every live member; --remove (repeatable: an id, an id prefix or a
name) also closes those members out for good. Every token and invite made before stops admitting.

\`mesh-inference plan\` shows which node would get which layers if this machine joined with --model and
--max-vram (and the serving flags above), the host, and why a node is left out or why the mesh waits,
computed by the election itself. With --join it looks at the running mesh as an observer that is never a
candidate (nothing restarts); without, at this machine alone. A running node answers GET /api/plan.

With no arguments at all it runs a demo: a 3-node mesh on loopback with a generated model whose
weights are random (so its answers are gibberish), serving the API on port ${DEFAULT_API_PORT}.

Examples:
  mesh-inference --model ~/models/glm.gguf                  # start a mesh; prints an invite token
  mesh-inference invite --ttl 1h                            # an invite that expires in an hour
  mesh-inference --model ~/models/glm.gguf --join mi2...    # add this machine's GPU to it
  mesh-inference --client --join mi1...                     # use it from a laptop without the model
  mesh-inference --model m.gguf --max-vram 6G --role worker # lend 6 GiB, never host
  mesh-inference plan --model m.gguf --max-vram 6G --join mi2...   # what would change if it joined
  mesh-inference --model m.gguf --ctx-size 32k --flash-attn on --cache-type q8_0  # long contexts
  curl localhost:${DEFAULT_API_PORT}/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"messages":[{"role":"user","content":"hi"}]}'
`;
