// The mesh-inference console: one node's view of the mesh, live from GET /api/events (a snapshot, then one
// event per change; docs/console.md). A fetch-based stream (not EventSource) so that the API key can go in
// an Authorization header; the key, when the node has one, stays in this tab's sessionStorage.
'use strict';
(() => {
  const KEY = 'mesh-inference-api-key';
  const $ = (id) => document.getElementById(id);
  const COLORS = ['#58a6ff', '#3fb950', '#d2a8ff', '#ff7b72', '#79c0ff', '#ffa657', '#a5d6ff', '#7ee787'];
  let state = null;
  const events = [];
  let colorOf = new Map();

  // ---- the stream ---------------------------------------------------------------------------------------
  function headers() {
    const key = sessionStorage.getItem(KEY);
    return key ? { authorization: `Bearer ${key}` } : {};
  }

  function setConn(s, text) {
    const el = $('conn');
    el.dataset.state = s;
    el.textContent = text;
  }

  let retryMs = 500;
  async function connect() {
    setConn('connecting', 'connecting…');
    let res;
    try {
      res = await fetch('/api/events', { headers: headers(), cache: 'no-store' });
    } catch {
      return retry();
    }
    if (res.status === 401) {
      setConn('down', 'needs the API key');
      $('key-form').hidden = false;
      return;
    }
    if (!res.ok || res.body === null) return retry();
    $('key-form').hidden = true;
    setConn('live', 'live');
    retryMs = 500;
    const reader = res.body.getReader();
    const decoder = new TextDecoder();
    let buf = '';
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trim()).join('\n');
          if (data !== '') onEvent(JSON.parse(data));
        }
      }
    } catch {
      // the node went away: retry below
    }
    retry();
  }

  function retry() {
    setConn('down', 'reconnecting…');
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, 5000);
  }

  $('key-form').addEventListener('submit', (e) => {
    e.preventDefault();
    sessionStorage.setItem(KEY, $('key').value.trim());
    $('key').value = '';
    connect();
  });

  // ---- the state ----------------------------------------------------------------------------------------
  function onEvent(e) {
    if (e.type === 'snapshot') {
      state = e.state;
      fetchPreview();
    } else if (state !== null) {
      apply(e);
    }
    if (e.type !== 'snapshot') {
      events.unshift(e);
      if (events.length > 80) events.pop();
    }
    schedule();
  }

  function apply(e) {
    const s = state;
    switch (e.type) {
      case 'node.seen': s.nodes = [...s.nodes.filter((n) => n.id !== e.node.id), e.node]; break;
      case 'node.forgotten': s.nodes = s.nodes.filter((n) => n.id !== e.id); break;
      case 'self.role': s.self.role = e.role; break;
      case 'peer.admitted': case 'peer.suspect': case 'peer.recovered': case 'peer.gone': case 'peer.state': s.peers[e.peer.id] = e.peer; break;
      case 'peer.removed': delete s.peers[e.id]; break;
      case 'link.changed': if (s.peers[e.peer]) s.peers[e.peer].link = e.link; break;
      case 'plan.elected': s.plan = e.plan; fetchPreview(); break;
      case 'plan.running': s.runningPlanId = e.planId; break;
      case 'machine.state': s.machines[e.machine] = e.state; break;
      case 'process.state': s.processes[e.process] = { state: e.state, port: e.port, ...(e.generation !== undefined ? { generation: e.generation } : {}) }; break;
      case 'llama.spawning': s.load = { planId: e.planId, generation: e.generation, phase: 'starting', percent: null }; break;
      case 'llama.loading': s.load = { planId: e.planId, generation: e.generation, phase: 'loading', percent: e.percent }; break;
      case 'llama.ready': s.load = { planId: e.planId, generation: e.generation, phase: 'ready', percent: 100 }; break;
      case 'llama.crashed': s.lastCrash = e.reason; break;
      case 'tunnel.path': s.tunnels = [...s.tunnels.filter((t) => !sameTunnel(t, e.tunnel)), e.tunnel]; break;
      case 'tunnel.closed': s.tunnels = s.tunnels.filter((t) => !sameTunnel(t, e.tunnel)); break;
      case 'request.started': s.requests.inFlight = [...s.requests.inFlight, e.request]; break;
      case 'request.finished':
        s.requests.inFlight = s.requests.inFlight.filter((r) => r.id !== e.request.id);
        s.requests.recent = [...s.requests.recent, e.request].slice(-20);
        break;
      default: break;
    }
  }

  const sameTunnel = (a, b) => a.peer === b.peer && a.kind === b.kind && a.side === b.side && a.path === b.path;

  // GET /api/plan (when the node serves it): the election explained, with each stage's layer range.
  let previewFor = null;
  let preview = null;
  async function fetchPreview() {
    const planId = state?.plan?.id ?? null;
    if (planId === previewFor) return;
    previewFor = planId;
    try {
      const res = await fetch('/api/plan', { headers: headers(), cache: 'no-store' });
      preview = res.ok ? await res.json() : null;
    } catch {
      preview = null;
    }
    $('preview').hidden = preview === null;
    if (preview !== null) $('preview-body').textContent = Array.isArray(preview.lines) ? preview.lines.join('\n') : JSON.stringify(preview, null, 2);
    schedule();
  }
  /** [from, to) of a stage's layers from the preview of the same plan; null without. */
  function layersOf(planId, id) {
    if (preview === null || preview.plan?.id !== planId || !Array.isArray(preview.stages)) return null;
    const st = preview.stages.find((x) => x.id === id);
    return Array.isArray(st?.layers) ? st.layers : null;
  }

  // ---- rendering ----------------------------------------------------------------------------------------
  let pending = false;
  function schedule() {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (state !== null) render();
    });
  }

  const nameOf = (id) => state.nodes.find((n) => n.id === id)?.name ?? (id === state.self.id ? state.self.name : id.slice(0, 10));
  const short = (id) => id.slice(0, 8);
  function gib(bytes) {
    if (bytes >= 1024 ** 3) return `${(bytes / 1024 ** 3).toFixed(1)} GiB`;
    return `${(bytes / 1024 ** 2).toFixed(bytes >= 100 * 1024 ** 2 ? 0 : 1)} MiB`;
  }
  function color(id) {
    if (!colorOf.has(id)) colorOf.set(id, COLORS[colorOf.size % COLORS.length]);
    return colorOf.get(id);
  }
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs ?? {})) {
      if (k === 'class') e.className = v;
      else if (k.startsWith('data-')) e.setAttribute(k, v);
      else e[k] = v;
    }
    for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return e;
  }
  function rows(tbody, list) {
    tbody.replaceChildren(...list);
  }

  function render() {
    const s = state;
    $('self').textContent = `${s.self.name} (${s.self.role}) · mesh ${s.self.meshId.slice(0, 8)}`;
    for (const n of [...s.nodes].sort((a, b) => a.name.localeCompare(b.name))) color(n.id);
    renderPlan(s);
    renderNodes(s);
    renderGraph(s);
    renderMachines(s);
    renderRequests(s);
    renderEvents();
  }

  function renderPlan(s) {
    const bar = $('plan-bar');
    const p = s.plan;
    $('plan-state').textContent = p === null ? '' : p.kind === 'ready' ? `(${p.id === s.runningPlanId ? 'running' : 'starting'} · ${p.model ?? ''})` : '(waiting)';
    $('plan-reason').textContent = p?.kind === 'waiting' ? p.reason : '';
    if (p === null || p.kind !== 'ready') {
      bar.replaceChildren(el('div', { class: 'empty' }, p === null ? 'no plan yet' : 'no layers placed'));
    } else {
      let from = 0;
      bar.replaceChildren(
        ...p.stages.map((st) => {
          const pct = st.share * 100;
          const layers = layersOf(p.id, st.id);
          const seg = el(
            'div',
            { class: `stage${st.id === p.host ? ' host' : ''}`, 'data-node-id': st.id, 'data-share': String(st.share), title: `${st.name}: ${from.toFixed(1)}–${(from + pct).toFixed(1)}% of the layers${st.id === p.host ? ' (host)' : ''}` },
            el('span', { class: 'stage-name' }, st.name),
            el('span', { class: 'stage-share' }, `${pct.toFixed(0)}%`),
            ...(layers !== null ? [el('span', { class: 'stage-layers' }, `layers ${layers[0]}–${layers[1] - 1}`)] : []),
            ...(st.id === p.host ? [el('span', { class: 'badge' }, 'host')] : []),
          );
          seg.style.flex = `${st.share} 1 0`;
          seg.style.background = color(st.id);
          from += pct;
          return seg;
        }),
      );
    }
    const l = s.load;
    $('load').hidden = l === null;
    if (l !== null) {
      const pct = l.phase === 'ready' ? 100 : (l.percent ?? 0);
      $('load-label').textContent = `llama-server generation ${l.generation}: ${l.phase}${l.phase === 'loading' && l.percent !== null ? ` ${l.percent.toFixed(0)}%` : ''}${s.lastCrash ? ` · last crash: ${s.lastCrash.split('\n')[0]}` : ''}`;
      $('load-fill').style.width = `${pct}%`;
    }
  }

  function stateClass(st) {
    if (st.startsWith('up.connected') || st === 'self') return 'state-up';
    if (st.startsWith('up.suspect') || st === 'dialing' || st === 'handshaking') return 'state-suspect';
    return 'state-down';
  }

  function renderNodes(s) {
    const roleIn = (id) => (s.plan?.kind === 'ready' ? (s.plan.host === id ? 'host' : s.plan.stages.some((x) => x.id === id) ? 'worker' : 'idle') : 'idle');
    const list = [...s.nodes].sort((a, b) => a.name.localeCompare(b.name)).map((n) => {
      const self = n.id === s.self.id;
      const peer = s.peers[n.id];
      const st = self ? 'self' : (peer?.state ?? 'not linked');
      return el(
        'tr',
        { 'data-node-id': n.id },
        el('td', {}, el('b', { class: 'node-name' }, n.name), ' ', el('span', { class: 'muted' }, short(n.id))),
        el('td', {}, `${roleIn(n.id)}${n.role !== 'auto' ? ` (${n.role})` : ''}${n.serving ? ' · serving' : ''}`),
        el('td', {}, n.vramBytes > 0 ? gib(n.vramBytes) : '–'),
        el('td', { class: stateClass(st) }, st),
        el('td', {}, self ? '–' : (peer?.link?.kind ?? 'none')),
        el('td', {}, self || peer?.link?.rttMs == null ? '–' : `${peer.link.rttMs} ms`),
      );
    });
    rows($('nodes').tBodies[0], list);
  }

  let cy = null;
  let graphKey = '';
  function renderGraph(s) {
    if (typeof cytoscape !== 'function') return;
    const nodes = s.nodes.map((n) => {
      const peer = s.peers[n.id];
      const host = s.plan?.kind === 'ready' && s.plan.host === n.id;
      const st = n.id === s.self.id ? 'this node' : (peer?.state ?? 'not linked');
      return { data: { id: n.id, label: `${n.name}${host ? ' ★host' : ''}\n${n.vramBytes > 0 ? gib(n.vramBytes) : 'client'} · ${st}`, color: color(n.id), border: host ? '#f0b429' : '#26313d' } };
    });
    const ids = new Set(s.nodes.map((n) => n.id));
    const edges = new Map();
    const add = (a, b, label, kind) => {
      if (!ids.has(a) || !ids.has(b) || a === b) return;
      const key = [a, b].sort().join('~');
      if (!edges.has(key) || kind !== 'gossip') edges.set(key, { data: { id: key, source: a, target: b, label, kind } });
    };
    for (const n of s.nodes) for (const to of n.connectedTo) add(n.id, to, '', 'gossip');
    for (const p of Object.values(s.peers)) {
      if (p.link === null || !p.state.startsWith('up')) continue;
      add(s.self.id, p.id, `${p.link.kind}${p.link.rttMs != null ? ` · ${p.link.rttMs} ms` : ''}`, p.link.kind);
    }
    if (cy === null) {
      cy = cytoscape({
        container: $('graph'),
        userZoomingEnabled: false,
        style: [
          { selector: 'node', style: { label: 'data(label)', 'text-wrap': 'wrap', 'text-valign': 'bottom', 'text-margin-y': 4, color: '#d8dee6', 'font-size': 10, 'background-color': 'data(color)', 'border-width': 3, 'border-color': 'data(border)', width: 26, height: 26 } },
          { selector: 'edge', style: { label: 'data(label)', 'font-size': 9, color: '#7d8a99', 'line-color': '#3b4856', width: 2, 'text-background-color': '#171e26', 'text-background-opacity': 1 } },
          { selector: 'edge[kind = "relay"]', style: { 'line-style': 'dashed', 'line-color': '#d29922' } },
          { selector: 'edge[kind = "direct-tls"]', style: { 'line-color': '#3fb950' } },
        ],
      });
    }
    const key = [...ids].sort().join(',');
    cy.batch(() => {
      const want = new Set([...nodes.map((n) => n.data.id), ...[...edges.values()].map((e) => e.data.id)]);
      cy.elements().forEach((e) => { if (!want.has(e.id())) e.remove(); });
      for (const n of nodes) (cy.getElementById(n.data.id).nonempty() ? cy.getElementById(n.data.id).data(n.data) : cy.add(n));
      for (const e of edges.values()) (cy.getElementById(e.data.id).nonempty() ? cy.getElementById(e.data.id).data(e.data) : cy.add(e));
    });
    if (key !== graphKey) {
      graphKey = key;
      cy.layout({ name: 'circle', padding: 40, sort: (a, b) => a.data('label').localeCompare(b.data('label')) }).run();
    }
  }

  function renderMachines(s) {
    const list = Object.entries(s.machines).map(([m, st]) => el('tr', { 'data-machine': m }, el('td', {}, m), el('td', {}, st)));
    for (const p of Object.values(s.peers).sort((a, b) => a.name.localeCompare(b.name))) {
      list.push(el('tr', { 'data-machine': `peer:${p.id}` }, el('td', {}, `peer ${p.name}`), el('td', { class: stateClass(p.state) }, `${p.state}${p.lastDown && !p.state.startsWith('up') ? ` (${p.lastDown})` : ''}`)));
    }
    const pr = s.processes;
    list.push(el('tr', {}, el('td', {}, 'rpc-server process'), el('td', {}, `${pr.rpcServer.state}${pr.rpcServer.port ? ` :${pr.rpcServer.port}` : ''}`)));
    list.push(el('tr', {}, el('td', {}, 'llama-server process'), el('td', {}, `${pr.llamaServer.state}${pr.llamaServer.port ? ` :${pr.llamaServer.port}` : ''} · gen ${pr.llamaServer.generation ?? 0}`)));
    rows($('machines').tBodies[0], list);
    rows($('tunnels').tBodies[0], s.tunnels.map((t) => el('tr', {}, el('td', {}, nameOf(t.peer)), el('td', {}, t.kind), el('td', {}, t.side), el('td', {}, t.path === 'direct' ? 'direct TLS' : 'QUIC'), el('td', {}, t.count))));
  }

  let chart = null;
  function renderRequests(s) {
    const r = s.requests;
    $('in-flight').textContent = String(r.inFlight.length);
    const done = r.recent.filter((x) => x.tokensPerSecond !== null);
    const last = done[done.length - 1];
    $('last-tps').textContent = last ? last.tokensPerSecond.toFixed(1) : '–';
    $('last-req').textContent = last ? `(${last.completionTokens} tokens in ${(last.durationMs / 1000).toFixed(1)} s, first after ${last.firstTokenMs} ms)` : '';
    rows($('requests').tBodies[0], [
      ...r.inFlight.map((x) => el('tr', { class: 'in-flight' }, el('td', {}, x.id.slice(-8)), el('td', {}, x.route), el('td', {}, 'in flight…'), el('td', {}, ''), el('td', {}, ''), el('td', {}, ''))),
      ...[...r.recent].reverse().map((x) => el('tr', {}, el('td', {}, x.id.slice(-8)), el('td', {}, x.route), el('td', {}, x.outcome + (x.continuations ? ` (+${x.continuations})` : '')), el('td', {}, x.completionTokens), el('td', {}, x.tokensPerSecond ?? '–'), el('td', {}, x.durationMs))),
    ]);
    if (typeof uPlot !== 'function') return;
    const data = [done.map((_, i) => i + 1), done.map((x) => x.tokensPerSecond)];
    if (chart === null) {
      chart = new uPlot({
        width: Math.max(280, $('tps-chart').clientWidth || 380),
        height: 140,
        scales: { x: { time: false } },
        axes: [{ stroke: '#7d8a99', grid: { stroke: '#26313d' } }, { stroke: '#7d8a99', grid: { stroke: '#26313d' } }],
        series: [{ label: 'request' }, { label: 'tokens/s', stroke: '#3fb950', width: 2, points: { show: true } }],
      }, data, $('tps-chart'));
    } else {
      chart.setData(data);
    }
  }

  function describe(e) {
    switch (e.type) {
      case 'node.seen': return `${e.node.name}: ${e.node.role}, ${gib(e.node.vramBytes)}${e.node.serving ? ', serving' : ''}`;
      case 'peer.admitted': case 'peer.suspect': case 'peer.recovered': case 'peer.gone': case 'peer.state': return `${e.peer.name}: ${e.peer.state}${e.type === 'peer.gone' && e.peer.lastDown ? ` (${e.peer.lastDown})` : ''}`;
      case 'link.changed': return `${nameOf(e.peer)}: ${e.link ? `${e.link.kind} ${e.link.rttMs ?? '?'} ms` : 'no connection'}`;
      case 'plan.elected': return e.plan?.kind === 'ready' ? e.plan.stages.map((x) => `${x.name}${x.id === e.plan.host ? '*' : ''} ${(x.share * 100).toFixed(0)}%`).join(', ') : (e.plan?.reason ?? 'none');
      case 'machine.state': return `${e.machine} → ${e.state}`;
      case 'process.state': return `${e.process} ${e.state}${e.port ? ` :${e.port}` : ''}`;
      case 'llama.loading': return `generation ${e.generation}: ${e.percent ?? '?'}%`;
      case 'llama.crashed': return `generation ${e.generation}: ${e.reason ?? ''}`;
      case 'tunnel.path': case 'tunnel.closed': return `${nameOf(e.tunnel.peer)} ${e.tunnel.kind} ${e.tunnel.side}: ${e.tunnel.path}`;
      case 'request.started': return `${e.request.id.slice(-8)} ${e.request.route}${e.request.stream ? ' (stream)' : ''}`;
      case 'request.continued': return `${e.id.slice(-8)} attempt ${e.attempt} after ${e.confirmedTokens} tokens: ${e.reason}`;
      case 'request.finished': return `${e.request.id.slice(-8)} ${e.request.outcome}: ${e.request.completionTokens} tokens, ${e.request.tokensPerSecond ?? '–'} tokens/s`;
      default: return '';
    }
  }

  function renderEvents() {
    rows($('events'), events.slice(0, 60).map((e) => el('li', { 'data-type': e.type }, el('span', {}, `${new Date(e.at).toLocaleTimeString()} `), `${e.type} `, el('span', {}, describe(e)))));
  }

  connect();
})();
