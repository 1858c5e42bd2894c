// The WAN benchmark's figure: generation tokens/s against round-trip time, measured points next to the
// physical limit 1 / (t_compute + k x RTT), one colour per layout and data path. Drawn by vega-lite as SVG
// (server side, no browser) and rasterised to PNG by resvg.
import { writeFile } from 'node:fs/promises';
import { Resvg } from '@resvg/resvg-js';
import * as vega from 'vega';
import * as vl from 'vega-lite';

export interface PlotPoint {
  /** "2 nodes, direct TLS" and the like: one colour each. */
  readonly series: string;
  readonly rttMs: number;
  readonly measured: number;
  /** The limit at this RTT, with t_compute and k of this series. */
  readonly limit: number;
}

/** Writes the figure as PNG. */
export async function plotTokensVsRtt(points: readonly PlotPoint[], pngPath: string, title: string): Promise<void> {
  const values = points.flatMap((p) => [
    { series: p.series, rtt: p.rttMs, tps: p.measured, kind: 'measured' },
    { series: p.series, rtt: p.rttMs, tps: p.limit, kind: 'limit 1/(t_compute + k·RTT)' },
  ]);
  const spec: vl.TopLevelSpec = {
    $schema: 'https://vega.github.io/schema/vega-lite/v5.json',
    title: { text: title, fontSize: 13 },
    width: 560,
    height: 340,
    background: 'white',
    config: { font: 'DejaVu Sans' },
    data: { values },
    encoding: {
      x: { field: 'rtt', type: 'quantitative', title: 'round-trip time between nodes (ms)', scale: { domain: [0, Math.max(...points.map((p) => p.rttMs))] } },
      y: { field: 'tps', type: 'quantitative', title: 'generation tokens/s' },
      color: { field: 'series', type: 'nominal', title: 'layout, data path' },
      strokeDash: { field: 'kind', type: 'nominal', title: null, sort: ['measured'], legend: { labelLimit: 400 } },
    },
    layer: [{ mark: { type: 'line', strokeWidth: 2 } }, { mark: { type: 'point', filled: true, size: 50 }, transform: [{ filter: "datum.kind === 'measured'" }] }],
  };
  const view = new vega.View(vega.parse(vl.compile(spec).spec), { renderer: 'none' });
  const svg = await view.toSVG();
  const png = new Resvg(svg, { fitTo: { mode: 'zoom', value: 2 }, font: { loadSystemFonts: true, defaultFontFamily: 'DejaVu Sans' } }).render().asPng();
  await writeFile(pngPath, png);
}
