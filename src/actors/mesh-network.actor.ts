// The node machine's `network` actor: a fromCallback around MeshNetwork that takes NetworkCommands and
// sends NetworkEvents back to its parent. It owns the MeshNetwork (not the endpoint) for exactly its lifetime.
import { fromCallback } from 'xstate';
import type { EndpointId } from '../machines/mesh-types.ts';
import type { NetworkCommand, NetworkEvent } from '../machines/protocol.ts';
import { MeshNetwork, type MeshNetworkComponents, type MeshNetworkInit } from '../io/mesh/mesh-network.ts';

/** Exported for tests that want the MeshNetwork behind an actor (peers(), direct calls). */
export type MeshNetworkFactory = (init: MeshNetworkInit, components: MeshNetworkComponents) => MeshNetwork;

const defaultFactory: MeshNetworkFactory = (init, components) => new MeshNetwork(init, components);

function run(
  init: MeshNetworkInit,
  components: MeshNetworkComponents,
  sendBack: (event: NetworkEvent) => void,
  receive: (listener: (command: NetworkCommand) => void) => void,
  factory: MeshNetworkFactory,
): () => void {
  const net = factory(init, components);
  net.start((event) => sendBack(event));
  receive((command) => net.execute(command));
  return () => {
    // Peers get `leaving` and the accept loop ends; the endpoint stays open for its owner to close.
    net.stop().catch((err: unknown) => components.logger.warn({ err: String(err) }, 'network stop failed'));
  };
}

/**
 * The composition root's way: everything the network needs is bound here, so the node machine's
 * `network` slot needs no input. Usage: `nodeMachine.provide({ actors: { network: createMeshNetworkLogic(init, components) } })`.
 */
export function createMeshNetworkLogic(init: MeshNetworkInit, components: MeshNetworkComponents, factory: MeshNetworkFactory = defaultFactory) {
  // The node machine's slot passes { self }: the endpoint already knows who we are; a mismatch is a wiring bug.
  return fromCallback<NetworkCommand, NetworkSlotInput>(({ input, sendBack, receive }) => {
    const self = (input as NetworkSlotInput | undefined)?.self;
    if (self !== undefined && self !== components.endpoint.id) {
      components.logger.error({ self, endpoint: components.endpoint.id }, 'network actor started for another id than its endpoint');
    }
    return run(init, components, sendBack, receive, factory);
  });
}

/** What the node machine's `network` slot passes (src/machines/node.machine.ts). */
export type NetworkSlotInput = { self: EndpointId };
