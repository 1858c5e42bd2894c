// The node's admin route, on its API: `POST /api/mesh/rotate {"remove": [ID | NAME, ...]}` rotates the mesh
// secret across the live members and removes the named ones. It needs the API's usual access (Host, `--api-key`)
// and a signature by the node's own key file (src/io/wire/admin-proof.ts): a local user who can reach the
// port but not read the key cannot change the mesh.
import type { FastifyInstance } from 'fastify';
import type { EndpointId } from '../../machines/mesh-types.ts';
import { ADMIN_PROOF_HEADER, checkAdminProof, ROTATE_PATH, type RotationAnswer } from '../wire/admin-proof.ts';
import { apiError, type ParsedBody } from './api-request.ts';

/** What the node does for an admin request; an AdminRefusal becomes a 4xx with its message. */
export interface AdminActions {
  /** This node's endpoint id: the key that must sign admin requests. */
  readonly owner: EndpointId;
  rotate(remove: readonly string[]): Promise<RotationAnswer>;
}

export class AdminRefusal extends Error {
  override name = 'AdminRefusal';
  constructor(
    message: string,
    readonly statusCode: 400 | 409 = 400,
  ) {
    super(message);
  }
}

export function installAdminRoutes(app: FastifyInstance, admin: AdminActions): void {
  app.post(ROTATE_PATH, async (request, reply) => {
    const body = request.body as ParsedBody | undefined;
    const raw = body?.raw ?? Buffer.alloc(0);
    const header = request.headers[ADMIN_PROOF_HEADER];
    const refused = checkAdminProof(admin.owner, typeof header === 'string' ? header : undefined, 'POST', ROTATE_PATH, raw);
    if (refused !== null) {
      request.log.warn({ why: refused }, 'refused an admin request');
      return reply.code(403).send(apiError(refused, 'permission_error', 'admin_proof'));
    }
    const json = (body?.json ?? {}) as { remove?: unknown };
    const remove = json.remove ?? [];
    if (!Array.isArray(remove) || remove.length > 64 || !remove.every((r) => typeof r === 'string' && r.length > 0 && r.length <= 128)) {
      return reply.code(400).send(apiError('"remove" must be a list of up to 64 node ids or names', 'invalid_request_error', 'bad_remove'));
    }
    try {
      return await admin.rotate(remove as string[]);
    } catch (err) {
      if (err instanceof AdminRefusal) return reply.code(err.statusCode).send(apiError(err.message, 'invalid_request_error', 'rotate_refused'));
      throw err;
    }
  });
}
