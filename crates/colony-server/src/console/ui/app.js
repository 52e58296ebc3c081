// The Colony console: a read-only view of one cluster, polled from this server's /ui/api/.
// The token is typed in once, kept in sessionStorage (this tab only) and sent as
// `Authorization: Bearer`; every answer is what the admin API lets that token see.

import { h, render, Component } from './vendor/preact.mjs';
import htm from './vendor/htm.mjs';
import { layout, NODE_WIDTH, NODE_HEIGHT } from './dag.js';

const html = htm.bind(h);
const TOKEN_KEY = 'colony.console.token';
const POLL_MS = 2000;
const TASK_STATES = ['blocked', 'pending', 'assigned', 'running', 'succeeded', 'failed', 'cancelled', 'timed_out', 'lost'];

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

// This port is plain HTTP: a token typed into a page reached over the network would cross it in
// clear. The server refuses API calls from anything but loopback, and the page does not send the
// token from a non-loopback address at all.
const LOOPBACK_HOSTS = ['localhost', '127.0.0.1', '[::1]'];
const OVER_LOOPBACK = location.protocol === 'https:' || LOOPBACK_HOSTS.includes(location.hostname) || location.hostname.startsWith('127.');
const PLAINTEXT_REFUSED = 'this console is plain HTTP, so it takes a token only over loopback: open it through ' +
  '`ssh -L 9101:127.0.0.1:9101 HOST` or `kubectl port-forward`, at http://127.0.0.1:PORT/ui';

async function api(path, token) {
  if (!OVER_LOOPBACK) {
    throw new ApiError(0, 'plaintext', PLAINTEXT_REFUSED);
  }
  let response;
  try {
    response = await fetch('/ui/api/' + path, {
      headers: { Authorization: 'Bearer ' + token },
      cache: 'no-store',
    });
  } catch (e) {
    throw new ApiError(0, 'unreachable', 'this server did not answer: ' + e.message);
  }
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    const message = body && body.error ? body.error : response.statusText;
    throw new ApiError(response.status, body && body.code ? body.code : 'http_' + response.status, message);
  }
  return body;
}

// ---- formatting ------------------------------------------------------------------------------

function bytes(n) {
  if (n == null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return (unit === 0 ? value : value.toFixed(value < 10 ? 1 : 0)) + ' ' + units[unit];
}

const cores = (millis) => String(Math.round(millis / 10) / 100);

function clock(ms) {
  if (!ms) return '—';
  return new Date(ms).toLocaleTimeString([], { hour12: false });
}

function when(ms) {
  if (!ms) return '—';
  const date = new Date(ms);
  const today = new Date();
  return date.toDateString() === today.toDateString()
    ? clock(ms)
    : date.toLocaleString([], { hour12: false });
}

function span(start, end) {
  if (!start) return '—';
  const ms = (end || Date.now()) - start;
  if (ms < 1000) return ms + ' ms';
  if (ms < 60000) return (ms / 1000).toFixed(1) + ' s';
  const minutes = Math.floor(ms / 60000);
  return minutes + ' m ' + Math.round((ms % 60000) / 1000) + ' s';
}

const mse = (x) => (x == null ? '—' : x.toFixed(4));

function stateBadge(state) {
  return html`<span class="badge state-${state}">${state.replace('_', ' ')}</span>`;
}

// ---- the route: #/VIEW[/ID][?QUERY] ------------------------------------------------------------

function parseRoute() {
  const hash = window.location.hash.replace(/^#\/?/, '');
  const [path, search] = hash.split('?');
  const parts = path.split('/').filter(Boolean);
  return { view: parts[0] || 'overview', id: parts[1], query: new URLSearchParams(search || '') };
}

function go(view, query) {
  const search = query && query.toString();
  window.location.hash = '#/' + view + (search ? '?' + search : '');
}

// ---- polling ---------------------------------------------------------------------------------

// Fetches `path` now and every POLL_MS while mounted; renders `view(data)`. A 401 signs out; a
// 403 or 404 is shown and not asked again.
class Poll extends Component {
  componentDidMount() {
    this.alive = true;
    this.tick();
  }

  componentWillUnmount() {
    this.alive = false;
    clearTimeout(this.timer);
  }

  async tick() {
    const { path, token, onFresh, onUnauthorized } = this.props;
    try {
      const data = await api(path, token);
      if (!this.alive) return;
      this.setState({ data, error: null });
      onFresh({ ok: true, serverId: data.server_id, appliedIndex: data.applied_index, leaderRead: data.leader_read, at: Date.now() });
    } catch (error) {
      if (!this.alive) return;
      if (error.status === 401) {
        onUnauthorized(error.message);
        return;
      }
      this.setState({ error });
      onFresh({ ok: false, at: Date.now(), error: error.message });
      // A token's grant never changes and a removed workflow does not come back: asking again
      // would only add refusals to the audit trail.
      if (error.status === 403 || error.status === 404) return;
    }
    this.timer = setTimeout(() => this.tick(), POLL_MS);
  }

  render({ path, view }, { data, error }) {
    let body;
    if (error && error.status === 403) {
      body = html`<div class="panel error" data-test="error" data-status="403">
        <strong>This token may not see this.</strong> The server said: ${error.message}
      </div>`;
    } else {
      const problem = error
        ? html`<div class="panel error" data-test="error" data-status=${error.status}>
            ${error.status === 404 ? 'Not found' : 'The server could not answer'}: ${error.message}
            ${data ? ' (showing the last answer)' : ''}
          </div>`
        : null;
      body = data ? html`${problem}${view(data)}` : problem || html`<div class="panel muted">Loading…</div>`;
    }
    // What was asked for and whether an answer came: lets a test wait for this view's data.
    return html`<div data-test="view" data-path=${path} data-loaded=${data || error ? 'true' : 'false'}>${body}</div>`;
  }
}

// ---- sign in ---------------------------------------------------------------------------------

class Login extends Component {
  constructor(props) {
    super(props);
    this.state = { token: '', error: props.reason || null, busy: false };
  }

  async submit(event) {
    event.preventDefault();
    const token = this.state.token.trim();
    if (!token) {
      this.setState({ error: 'Paste a token first.' });
      return;
    }
    this.setState({ busy: true, error: null });
    try {
      await api('overview', token);
      this.props.onToken(token);
    } catch (error) {
      this.setState({ busy: false, error: 'Refused: ' + error.message });
    }
  }

  render(_, { token, error, busy }) {
    return html`<main class="login">
      <form class="panel" data-test="login" onSubmit=${(e) => this.submit(e)}>
        <h1><span class="logo"></span>Colony console</h1>
        <p class="muted">Sign in with an ACL token. The console shows what the token may read, nothing more.</p>
        <label for="token">Token</label>
        <input id="token" type="password" autocomplete="off" spellcheck="false" placeholder="colony1.…"
          value=${token} onInput=${(e) => this.setState({ token: e.currentTarget.value })} />
        <button type="submit" disabled=${busy}>${busy ? 'Checking…' : 'Sign in'}</button>
        ${error && html`<p class="login-error" data-test="login-error">${error}</p>`}
        <p class="muted small">The token stays in this tab (sessionStorage) and goes to this server only.</p>
      </form>
    </main>`;
  }
}

// ---- views -----------------------------------------------------------------------------------

function Stat({ label, value, test }) {
  return html`<div class="stat"><div class="stat-label">${label}</div><div class="stat-value" data-test=${test}>${value}</div></div>`;
}

function Counts({ counts, test }) {
  const entries = Object.entries(counts || {}).filter(([, n]) => n > 0);
  if (entries.length === 0) return html`<span class="muted">none</span>`;
  return html`<div class="chips" data-test=${test}>
    ${entries.map(([state, n]) => html`<span class="chip state-${state}">${state.replace('_', ' ')} <b>${n}</b></span>`)}
  </div>`;
}

function overview(d) {
  const voters = d.members.filter((m) => m.role === 'voter').length;
  const reachable = d.members.filter((m) => m.reachable).length;
  return html`<section>
    <div class="stats">
      <${Stat} label="Leader" test="leader" value=${d.leader_id == null ? 'none' : 'server ' + d.leader_id} />
      <${Stat} label="Term" test="term" value=${d.term} />
      <${Stat} label="Members" test="member-count" value=${d.members.length} />
      <${Stat} label="Voters reachable" value=${reachable + ' / ' + voters} />
      <${Stat} label="This server" value=${'server ' + d.server_id + ' (' + d.state + ')'} />
      <${Stat} label="Applied / commit" value=${d.applied_index + ' / ' + d.commit_index} />
    </div>
    <h2>Members</h2>
    <table class="table">
      <thead><tr><th>ID</th><th>Address</th><th>Role</th><th>Leader</th><th>Reachable</th><th>Matched index</th></tr></thead>
      <tbody>
        ${d.members.map((m) => html`<tr data-test="member" data-leader=${String(m.leader)}>
          <td>${m.id}</td><td class="mono">${m.addr}</td><td>${m.role}</td>
          <td>${m.leader ? html`<span class="badge leader" data-test="leader-badge">leader · term ${d.term}</span>` : ''}</td>
          <td>${m.reachable ? html`<span class="ok">yes</span>` : html`<span class="bad">no</span>`}</td>
          <td>${m.matched_index == null ? html`<span class="muted" title="known to the leader only">—</span>` : m.matched_index}</td>
        </tr>`)}
      </tbody>
    </table>
    ${d.joint && html`<p class="panel warn">A membership change is in progress (joint consensus).</p>`}
    <div class="two">
      <div><h2>Tasks by state <span class="muted small">(${d.task_count}, every namespace)</span></h2><${Counts} counts=${d.tasks_by_state} test="tasks-by-state" /></div>
      <div><h2>Executors by state</h2><${Counts} counts=${d.executors_by_state} test="executors-by-state" /></div>
    </div>
    <p class="muted small">Cluster ${d.cluster_id} · Colony ${d.version}</p>
  </section>`;
}

function Bar({ resource, label, used, capacity, format }) {
  const pct = capacity > 0 ? Math.min(100, (used / capacity) * 100) : 0;
  const level = pct >= 90 ? 'high' : pct >= 60 ? 'mid' : 'low';
  return html`<div class="bar-row">
    <span class="bar-label">${label}</span>
    <div class="bar" data-test="bar" data-resource=${resource} data-used=${used} data-capacity=${capacity}
      title=${capacity > 0 ? Math.round(pct) + '% allocated' : 'none offered'}>
      <div class=${'fill ' + level} style=${{ width: pct + '%' }}></div>
    </div>
    <span class="bar-text">${capacity > 0 ? format(used) + ' / ' + format(capacity) : 'none'}</span>
  </div>`;
}

function executors(d) {
  if (d.executors.length === 0) {
    return html`<div class="panel muted" data-test="no-executors">No executors have joined. Start one with <code>colony executor --join … --token JOIN_TOKEN</code>.</div>`;
  }
  return html`<section class="cards">
    ${d.executors.map((e) => html`<article class="card" data-test="executor" data-name=${e.name}>
      <header><strong>${e.name}</strong> <span class="muted">#${e.id}</span> ${stateBadge(e.state)}</header>
      <${Bar} resource="cpu" label="CPU" used=${e.allocated.cpu_millis} capacity=${e.capacity.cpu_millis} format=${(m) => cores(m) + ' cores'} />
      <${Bar} resource="memory" label="Memory" used=${e.allocated.memory_bytes} capacity=${e.capacity.memory_bytes} format=${bytes} />
      <${Bar} resource="gpus" label="GPUs" used=${e.allocated.gpus} capacity=${e.capacity.gpus} format=${(n) => String(n)} />
      ${Object.entries(e.capacity.custom).map(([name, n]) => html`<${Bar} resource=${name} label=${name}
        used=${e.allocated.custom[name] || 0} capacity=${n} format=${(x) => String(x)} />`)}
      <p class="small">
        ${e.tasks} task${e.tasks === 1 ? '' : 's'} held
        ${e.heartbeat_age_ms != null ? html` · heartbeat ${e.heartbeat_age_ms} ms ago` : html` · <span class="muted" title="the leader knows heartbeats; this answer is from this server's state">heartbeat known to the leader</span>`}
      </p>
      <p class="chips">
        ${Object.entries(e.labels).map(([k, v]) => html`<span class="chip">${k}=${v}</span>`)}
        ${e.capabilities.map((c) => html`<span class="chip cap">${c}</span>`)}
      </p>
      ${e.reason && html`<p class="small muted">${e.reason}</p>`}
    </article>`)}
  </section>`;
}

class TaskFilters extends Component {
  constructor(props) {
    super(props);
    this.state = { state: props.query.get('state') || '', namespace: props.query.get('namespace') || '' };
  }

  apply(event) {
    event.preventDefault();
    const query = new URLSearchParams();
    if (this.state.state) query.set('state', this.state.state);
    if (this.state.namespace.trim()) query.set('namespace', this.state.namespace.trim());
    go('tasks', query);
  }

  render(_, { state, namespace }) {
    return html`<form class="filters" data-test="task-filters" onSubmit=${(e) => this.apply(e)}>
      <label>State
        <select name="state" value=${state} onChange=${(e) => this.setState({ state: e.currentTarget.value })}>
          <option value="">all</option>
          ${TASK_STATES.map((s) => html`<option value=${s}>${s.replace('_', ' ')}</option>`)}
        </select>
      </label>
      <label>Namespace
        <input name="namespace" placeholder="any" value=${namespace} onInput=${(e) => this.setState({ namespace: e.currentTarget.value })} />
      </label>
      <button type="submit">Filter</button>
    </form>`;
  }
}

function tasksPath(query) {
  const q = new URLSearchParams();
  for (const key of ['state', 'namespace', 'after']) {
    if (query.get(key)) q.set(key, query.get(key));
  }
  q.set('limit', '50');
  return 'tasks?' + q.toString();
}

function tasks(query) {
  return (d) => {
    const next = new URLSearchParams(query);
    next.set('after', String(d.next_after));
    const first = new URLSearchParams(query);
    first.delete('after');
    return html`<section>
      <table class="table" data-test="tasks">
        <thead><tr><th>ID</th><th>Name</th><th>Namespace</th><th>State</th><th>Attempt</th><th>Executor</th><th>Asked for</th><th>Created</th><th>Ran</th><th>Reason</th></tr></thead>
        <tbody>
          ${d.tasks.map((t) => html`<tr data-test="task" data-state=${t.state} data-namespace=${t.namespace}>
            <td>${t.id}</td><td class="mono">${t.name}</td><td>${t.namespace}</td><td>${stateBadge(t.state)}</td>
            <td>${t.attempt}</td><td>${t.executor_id == null ? '—' : '#' + t.executor_id}</td>
            <td class="small">${cores(t.requested.cpu_millis)} cpu · ${bytes(t.requested.memory_bytes)}${t.requested.gpus ? ' · ' + t.requested.gpus + ' gpu' : ''}</td>
            <td>${when(t.created_unix_ms)}</td><td>${span(t.started_unix_ms, t.finished_unix_ms)}</td>
            <td class="small reason">${t.reason || (t.exit_code != null ? 'exit ' + t.exit_code : '')}</td>
          </tr>`)}
        </tbody>
      </table>
      ${d.tasks.length === 0 && html`<div class="panel muted" data-test="no-tasks">No tasks this token may see match these filters.</div>`}
      <div class="pager">
        ${query.get('after') && html`<a href=${'#/tasks?' + first.toString()}>← First page</a>`}
        ${d.next_after ? html`<a data-test="next-page" href=${'#/tasks?' + next.toString()}>Next page →</a>` : html`<span class="muted small">last page</span>`}
      </div>
    </section>`;
  };
}

function workflows(d) {
  if (d.workflows.length === 0) {
    return html`<div class="panel muted" data-test="no-workflows">No workflows this token may see. Submit one with <code>colony workflow submit FILE</code>.</div>`;
  }
  return html`<table class="table">
    <thead><tr><th>ID</th><th>Name</th><th>Namespace</th><th>State</th><th>Steps</th><th>Created</th><th>Took</th></tr></thead>
    <tbody>
      ${d.workflows.map((w) => html`<tr data-test="workflow" data-name=${w.name} data-state=${w.state}>
        <td><a href=${'#/workflows/' + w.id}>${w.id}</a></td><td><a href=${'#/workflows/' + w.id}>${w.name}</a></td>
        <td>${w.namespace}</td><td>${stateBadge(w.state)}</td><td><${Counts} counts=${w.steps_by_state} /></td>
        <td>${when(w.created_unix_ms)}</td><td>${span(w.created_unix_ms, w.finished_unix_ms)}</td>
      </tr>`)}
    </tbody>
  </table>`;
}

// "2/3 tasks done": how many of the step's current tasks succeeded.
function taskSummary(step) {
  const counts = step.tasks_by_state;
  const total = Object.values(counts).reduce((a, b) => a + b, 0);
  if (total === 0) return '';
  return (counts.succeeded || 0) + '/' + total + (total === 1 ? ' task' : ' tasks') + ' done';
}

function Dag({ steps }) {
  const { nodes, edges, width, height } = layout(steps);
  return html`<svg class="dag" data-test="dag" viewBox=${'0 0 ' + width + ' ' + height} width=${width} height=${height}
      role="img" aria-label="the workflow's steps and their dependencies">
    <defs>
      <marker id="arrow" viewBox="0 0 10 10" refX="4" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">
        <path d="M 0 0 L 10 5 L 0 10 z" class="arrow" />
      </marker>
    </defs>
    ${edges.map((e) => html`<path data-test="edge" data-from=${e.from} data-to=${e.to} class="edge" d=${e.path} marker-end="url(#arrow)" />`)}
    ${nodes.map(({ step, x, y }) => html`<g data-test="step" data-step=${step.name} data-state=${step.state} transform=${'translate(' + x + ',' + y + ')'}>
      <title>${step.name}: ${step.state}${step.reason ? ' — ' + step.reason : ''}</title>
      <rect class=${'node state-' + step.state} width=${NODE_WIDTH} height=${NODE_HEIGHT} rx="8" />
      <text x="12" y="22" class="node-name">${step.name}${step.for_each ? ' ×' + step.task_ids.length : ''}</text>
      <text x="12" y="42" class="node-detail">${step.state.replace('_', ' ')}${taskSummary(step) ? ' · ' + taskSummary(step) : ''}</text>
    </g>`)}
  </svg>`;
}

function workflow(d) {
  const params = Object.entries(d.params);
  return html`<section>
    <h2 class="title">
      <a href="#/workflows" class="muted">Workflows</a> / ${d.name} <span class="muted">#${d.id}</span> ${stateBadge(d.state)}
    </h2>
    <p class="small">
      Namespace <b>${d.namespace}</b>${' · created ' + when(d.created_unix_ms)}${' · '}
      ${d.finished_unix_ms ? 'took ' + span(d.created_unix_ms, d.finished_unix_ms) : 'running for ' + span(d.created_unix_ms)}
      ${' · outputs ' + bytes(d.output_bytes)}
      ${params.length > 0 && html`${' · params '}${params.map(([k, v]) => html`<code>${k}=${v}</code>${' '}`)}`}
    </p>
    ${d.reason && html`<p class="panel warn">${d.reason}</p>`}
    <div class="dag-box"><${Dag} steps=${d.steps} /></div>
    <div class="legend">${['waiting', 'running', 'succeeded', 'failed', 'cancelled'].map((s) => html`<span><i class=${'swatch state-' + s}></i>${s}</span>`)}</div>
    <table class="table">
      <thead><tr><th>Step</th><th>State</th><th>After</th><th>Tasks</th><th>Runs</th><th>Took</th><th>Reason</th></tr></thead>
      <tbody>
        ${d.steps.map((s) => html`<tr data-test="step-row" data-step=${s.name}>
          <td class="mono">${s.name}${s.for_each && html` <span class="muted small">for each ${s.for_each}</span>`}</td>
          <td>${stateBadge(s.state)}</td><td class="small">${s.upstream.join(', ') || '—'}</td>
          <td><${Counts} counts=${s.tasks_by_state} /></td><td>${s.runs}</td>
          <td>${span(s.started_unix_ms, s.finished_unix_ms)}</td><td class="small reason">${s.reason}</td>
        </tr>`)}
      </tbody>
    </table>
  </section>`;
}

// An instance's reason, or what it waits for: a restart's backoff.
function instanceNote(i) {
  if (i.reason) return i.reason;
  if (i.not_before_unix_ms && i.not_before_unix_ms > Date.now()) return 'restarts at ' + clock(i.not_before_unix_ms);
  return '';
}

function Agent({ agent: a }) {
  const key = a.namespace + '/' + a.name;
  return html`<article class="panel agent" data-test="agent" data-namespace=${a.namespace} data-name=${a.name}
      data-state=${a.state} data-running=${a.running} data-instances=${a.instances.length}>
    <header class="agent-head">
      <strong class="mono">${key}</strong> ${stateBadge(a.state)}
      <span class="muted small">version ${a.version} · restart ${a.restart || 'on-failure'} · each ${cores(a.requested.cpu_millis)} cpu · ${bytes(a.requested.memory_bytes)}${a.requested.gpus ? ' · ' + a.requested.gpus + ' gpu' : ''}</span>
    </header>
    <div class="agent-stats">
      <${Stat} label="Running / instances" test="agent-running" value=${a.running + ' / ' + a.instances.length} />
      <${Stat} label="Replicas" test="agent-replicas" value=${a.replicas} />
      <${Stat} label="Restarts" test="agent-restarts" value=${a.restarts} />
      <${Stat} label="Updated" value=${when(a.updated_unix_ms)} />
    </div>
    ${a.reason && html`<p class="panel warn small">${a.reason}</p>`}
    ${a.instances.length === 0
      ? html`<p class="muted small">No instances${a.state === 'stopped' ? ': the agent is stopped' : ''}.</p>`
      : html`<table class="table">
        <thead><tr><th>Instance</th><th>Task</th><th>State</th><th>Version</th><th>Executor</th><th>Restarts</th><th>Replacing</th><th>Endpoint</th><th>Reason</th></tr></thead>
        <tbody>
          ${a.instances.map((i) => html`<tr data-test="agent-instance" data-index=${i.index} data-state=${i.state}>
            <td title=${'task name ' + a.name + '-' + i.index}>${i.index}</td><td>${i.task_id}</td><td>${stateBadge(i.state)}</td>
            <td>${i.version}${i.version !== a.version ? html` <span class="muted small">(agent at ${a.version})</span>` : ''}</td>
            <td>${i.executor_id == null ? '—' : '#' + i.executor_id}</td><td>${i.restarts}</td>
            <td>${i.replacing == null ? '—' : html`<span class="mono">${i.replacing}</span>`}</td>
            <td data-test="agent-endpoint" title="healthy, in the registry (colony agent endpoints)">${i.endpoint == null ? '—' : html`<span class="mono">${i.endpoint}</span>`}</td>
            <td class="small reason">${instanceNote(i)}</td>
          </tr>`)}
        </tbody>
      </table>`}
  </article>`;
}

function agents(d) {
  if (d.agents.length === 0) {
    return html`<div class="panel muted" data-test="no-agents">No agents this token may see. Start one with
      <code>colony agent run --name NAME --replicas N -- PROGRAM [ARGS]</code>.</div>`;
  }
  return html`<section>
    ${d.total > d.agents.length && html`<p class="panel warn">Showing the first ${d.agents.length} of ${d.total} agents.</p>`}
    ${d.agents.map((a) => html`<${Agent} key=${a.namespace + '/' + a.name} agent=${a} />`)}
    <p class="muted small">An instance's task is the one it runs now: each restart, or a rolled-out update, runs it as a new task.</p>
  </section>`;
}

function models(d) {
  if (d.models.length === 0) {
    return html`<div class="panel muted" data-test="no-models">No model is published yet: the learner publishes
      one once it beats the per-kind baseline on its holdout set.</div>`;
  }
  const worst = Math.max(...d.models.map((m) => Math.max(m.holdout_mse, m.baseline_mse)), 1e-9);
  return html`<table class="table">
    <thead><tr><th>Version</th><th>Created</th><th>Device</th><th>Holdout error (MSE)</th><th>Baseline</th><th>Previous</th><th>vs baseline</th><th>Rows (train / holdout)</th><th>Weights</th></tr></thead>
    <tbody>
      ${d.models.map((m) => html`<tr data-test="model" data-version=${m.version} data-current=${String(m.current)}>
        <td><b>v${m.version}</b> ${m.current && html`<span class="badge leader">current</span>`}</td>
        <td>${when(m.created_unix_ms)}</td><td>${m.device}</td>
        <td>
          <div class="mse"><span data-test="holdout-mse">${mse(m.holdout_mse)}</span>
            <div class="bar thin"><div class="fill low" style=${{ width: (m.holdout_mse / worst) * 100 + '%' }}></div></div></div>
        </td>
        <td>
          <div class="mse"><span>${mse(m.baseline_mse)}</span>
            <div class="bar thin"><div class="fill mid" style=${{ width: (m.baseline_mse / worst) * 100 + '%' }}></div></div></div>
        </td>
        <td>${mse(m.previous_mse)}</td>
        <td>${m.baseline_mse > 0 ? Math.round((1 - m.holdout_mse / m.baseline_mse) * 100) + '% lower' : '—'}</td>
        <td>${m.train_rows} / ${m.holdout_rows}</td><td>${bytes(m.weights_bytes)}</td>
      </tr>`)}
    </tbody>
  </table>
  <p class="muted small">Errors are mean squared errors of log1p(runtime ms) and log1p(peak bytes) on the learner's holdout set; lower is better.</p>`;
}

// ---- the app ---------------------------------------------------------------------------------

const VIEWS = [
  ['overview', 'Overview'],
  ['executors', 'Executors'],
  ['tasks', 'Tasks'],
  ['workflows', 'Workflows'],
  ['agents', 'Agents'],
  ['models', 'Models'],
];

class App extends Component {
  constructor() {
    super();
    this.state = { token: sessionStorage.getItem(TOKEN_KEY), route: parseRoute(), fresh: null, reason: null };
    this.onHash = () => this.setState({ route: parseRoute() });
    this.onFresh = (fresh) => this.setState({ fresh });
    this.onUnauthorized = (message) => this.signOut('Signed out: ' + message);
  }

  componentDidMount() {
    window.addEventListener('hashchange', this.onHash);
  }

  componentWillUnmount() {
    window.removeEventListener('hashchange', this.onHash);
  }

  signIn(token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    this.setState({ token, reason: null });
  }

  signOut(reason) {
    sessionStorage.removeItem(TOKEN_KEY);
    this.setState({ token: null, fresh: null, reason: reason || null });
  }

  content(route, token) {
    const poll = (path, view) => html`<${Poll} key=${path} path=${path} token=${token} view=${view}
      onFresh=${this.onFresh} onUnauthorized=${this.onUnauthorized} />`;
    switch (route.view) {
      case 'executors':
        return poll('executors', executors);
      case 'tasks': {
        const path = tasksPath(route.query);
        return html`<${TaskFilters} key=${'filters' + path} query=${route.query} />${poll(path, tasks(route.query))}`;
      }
      case 'workflows':
        return route.id ? poll('workflows/' + encodeURIComponent(route.id), workflow) : poll('workflows?limit=200', workflows);
      case 'agents':
        return poll('agents', agents);
      case 'models':
        return poll('models', models);
      default:
        return poll('overview', overview);
    }
  }

  render(_, { token, route, fresh, reason }) {
    if (!token) return html`<${Login} reason=${reason} onToken=${(t) => this.signIn(t)} />`;
    let asOf = '';
    if (fresh && fresh.ok) {
      let read = ' · from its applied state';
      if (fresh.appliedIndex != null) read = ' · as of its applied index ' + fresh.appliedIndex;
      else if (fresh.leaderRead) read = ' · read through the leader';
      asOf = 'server ' + fresh.serverId + read + ' · ' + clock(fresh.at);
    } else if (fresh && !fresh.ok) {
      asOf = 'not updated since ' + clock(fresh.at);
    }
    return html`<div class="shell">
      <header class="top">
        <span class="brand"><span class="logo"></span>Colony</span>
        <nav>
          ${VIEWS.map(([view, label]) => html`<a data-nav=${view} class=${route.view === view ? 'active' : ''} href=${'#/' + view}>${label}</a>`)}
        </nav>
        <span class="live" data-test="as-of"><i class=${'dot ' + (fresh && !fresh.ok ? 'down' : 'up')}></i>${asOf}</span>
        <button class="link" data-test="sign-out" onClick=${() => this.signOut()}>Sign out</button>
      </header>
      <main class="content" data-view=${route.view}>${this.content(route, token)}</main>
    </div>`;
  }
}

render(html`<${App} />`, document.getElementById('app'));
