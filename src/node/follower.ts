// The node's one follower of its own snapshots (build.ts subscribes it): the tunnels follow every snapshot (the
// hand-off, dead links, listeners), and the log says when the state, the plan or a drain changes.
import type { SnapshotFrom } from 'xstate';
import type { NodeTunnels } from '../actors/tunnels.actor.ts';
import type { Logger } from '../io/host/logger.ts';
import { DRAIN_TIMEOUT_MS, runningRole, type nodeMachine } from '../machines/node.machine.ts';
import { nameOf } from './status.ts';

/** The node's one follower: the tunnels (hand-off, dead links, listeners) and the logs of state and plan. */
export function follower(tunnels: NodeTunnels, log: Logger): (snap: SnapshotFrom<typeof nodeMachine>) => void {
  let lastState = '';
  let lastPlanId: string | null = null;
  return (snap) => {
    const c = snap.context;
    tunnels.follow(c);
    const state = JSON.stringify(snap.value);
    if (state !== lastState) {
      lastState = state;
      log.debug({ state: snap.value, role: runningRole(c) }, 'node state');
      if (snap.matches('draining') || snap.matches({ leaving: 'draining' })) {
        const what = runningRole(c) === 'host' ? `${c.inFlight} request(s) in flight finish` : 'the host finish its requests';
        log.info({ inFlight: c.inFlight }, `a planned change: letting ${what} first (at most ${DRAIN_TIMEOUT_MS / 1000} s)`);
      }
    }
    if (c.running !== null && c.running.id !== lastPlanId) {
      lastPlanId = c.running.id;
      const plan = c.running;
      if (plan.kind === 'ready') {
        const names = plan.stages.map((s) => `${nameOf(c, s.id)} ${(s.share * 100).toFixed(0)}%`).join(', ');
        log.info({ plan: plan.id, host: nameOf(c, plan.host), role: runningRole(c) }, `plan: host ${nameOf(c, plan.host)}; layers: ${names}`);
      } else {
        log.warn({ plan: plan.id }, `waiting: ${plan.reason}`);
      }
    }
  };
}
