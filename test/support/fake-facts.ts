// A stand-in for the announcement signer of src/io/wire/announcement-signature.ts, for machine tests and the
// churn simulator, whose node ids are not ed25519 keys: the "signature" is a tag derived from the owner's id
// and the announcement's (epoch, seq, facts), so any change by anyone else fails `verify`, as with the real
// one. Pure and cheap; never used outside tests.
import type { Announcement, AnnouncementAuthority } from '../../src/machines/mesh-types.ts';

const utf8 = new TextEncoder();

function tag(a: Announcement): Uint8Array {
  const { sig: _, ...fields } = a;
  // The tag holds the whole content, so a tampered field never verifies.
  return utf8.encode(`fake-sig:${JSON.stringify(fields)}`);
}

/** Signs like the owner would; verifies that `sig` is the owner's tag of exactly these facts. */
export function fakeFacts(): AnnouncementAuthority {
  return {
    sign: (a) => ({ ...a, sig: tag(a) }),
    verify: (a) => {
      if (a.sig === undefined) return false;
      const want = tag(a);
      if (want.length !== a.sig.length) return false;
      for (let i = 0; i < want.length; i++) if (want[i] !== a.sig[i]) return false;
      return true;
    },
  };
}
