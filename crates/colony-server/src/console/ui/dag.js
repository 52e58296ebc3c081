// The layout of a workflow's DAG: steps in columns by depth (the longest chain of upstream steps
// before them), each column ordered by where its upstream steps sit, edges as curves from a step's
// right side to its dependent's left side; an edge that skips columns arcs over the top, so it
// never hides behind the steps between. Pure: steps in, coordinates out; app.js draws them.

export const NODE_WIDTH = 200;
export const NODE_HEIGHT = 58;
const COLUMN_GAP = 90;
const ROW_GAP = 26;
const PAD = 16;
const LANE = 44;
// Where an edge that skips columns leaves and enters a step, in from its corner.
const INSET = 36;

// steps: [{name, upstream: [name]}] in the spec's order.
export function layout(steps) {
  const byName = new Map(steps.map((step, index) => [step.name, { step, index }]));
  const depth = new Map();
  const depthOf = (name, seen) => {
    if (depth.has(name)) return depth.get(name);
    // A validated workflow has no cycles; the guard keeps a bad answer from hanging the page.
    if (seen.has(name)) return 0;
    seen.add(name);
    const ups = byName.get(name).step.upstream.filter((u) => byName.has(u));
    const d = ups.length === 0 ? 0 : 1 + Math.max(...ups.map((u) => depthOf(u, seen)));
    depth.set(name, d);
    return d;
  };
  steps.forEach((step) => depthOf(step.name, new Set()));

  const columns = [];
  steps.forEach((step) => {
    const d = depth.get(step.name);
    (columns[d] = columns[d] || []).push(step);
  });
  // Order each column by the mean row of its upstream steps (fewer crossings), then spec order.
  const row = new Map();
  columns.forEach((column, d) => {
    const weight = (step) => {
      const rows = step.upstream.filter((u) => row.has(u)).map((u) => row.get(u));
      return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : byName.get(step.name).index;
    };
    if (d > 0) {
      column.sort((a, b) => weight(a) - weight(b) || byName.get(a.name).index - byName.get(b.name).index);
    }
    column.forEach((step, r) => row.set(step.name, r));
  });

  const skips = steps.some((step) =>
    step.upstream.some((u) => depth.has(u) && depth.get(step.name) - depth.get(u) > 1));
  // Room above the steps for the edges that skip columns.
  const lane = skips ? LANE : 0;
  const tallest = Math.max(1, ...columns.map((c) => c.length));
  const height = PAD * 2 + lane + tallest * NODE_HEIGHT + (tallest - 1) * ROW_GAP;
  const width = PAD * 2 + columns.length * NODE_WIDTH + Math.max(0, columns.length - 1) * COLUMN_GAP;
  const position = new Map();
  const nodes = [];
  columns.forEach((column, d) => {
    const columnHeight = column.length * NODE_HEIGHT + (column.length - 1) * ROW_GAP;
    const top = lane + (height - lane - columnHeight) / 2;
    column.forEach((step, r) => {
      const x = PAD + d * (NODE_WIDTH + COLUMN_GAP);
      const y = top + r * (NODE_HEIGHT + ROW_GAP);
      position.set(step.name, { x, y });
      nodes.push({ step, x, y, depth: d });
    });
  });

  const edges = [];
  steps.forEach((step) => {
    step.upstream.filter((u) => position.has(u)).forEach((u) => {
      const from = position.get(u);
      const to = position.get(step.name);
      const x1 = from.x + NODE_WIDTH;
      const y1 = from.y + NODE_HEIGHT / 2;
      const x2 = to.x;
      const y2 = to.y + NODE_HEIGHT / 2;
      const bend = Math.max(30, (x2 - x1) / 2);
      let path = `M ${x1} ${y1} C ${x1 + bend} ${y1}, ${x2 - bend} ${y2}, ${x2 - 6} ${y2}`;
      if (depth.get(step.name) - depth.get(u) > 1) {
        // From the source's top to the target's top. Both control points at one height put the
        // curve's middle at (start + end) / 8 + 3/4 of that height: chosen so the middle runs
        // through the lane above every step.
        const [sx, sy, ex, ey] = [x1 - INSET, from.y, to.x + INSET, to.y - 6];
        const peak = (PAD + lane / 2 - (sy + ey) / 8) / 0.75;
        path = `M ${sx} ${sy} C ${sx} ${peak}, ${ex} ${peak}, ${ex} ${ey}`;
      }
      edges.push({ from: u, to: step.name, path });
    });
  });
  return { nodes, edges, width, height };
}
