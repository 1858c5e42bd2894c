// Sizes for people: the unit that shows the number (GiB from 1 GiB up, MiB under it, KiB under a MiB), so a
// 45 MiB model never reads "0.0 GB". Pure: the CLI, the logs, the election's reasons and the console use it.

const KIB = 1024;
const MIB = 1024 ** 2;
const GIB = 1024 ** 3;

/** "12.3 GiB", "45 MiB", "9.5 MiB", "512 KiB", "17 B"; nonsense (NaN, negative, infinite) as it is. */
export function formatSize(bytes: number): string {
  if (!Number.isFinite(bytes) || bytes < 0) return `${bytes} B`;
  if (bytes >= GIB) return `${(bytes / GIB).toFixed(1)} GiB`;
  if (bytes >= MIB) return `${scaled(bytes / MIB)} MiB`;
  if (bytes >= KIB) return `${scaled(bytes / KIB)} KiB`;
  return `${Math.round(bytes)} B`;
}

// Three significant digits at most, never "0": 512, 45, 9.5 (a whole number under 10 keeps one decimal).
function scaled(n: number): string {
  return n >= 10 ? n.toFixed(0) : n.toFixed(1);
}
