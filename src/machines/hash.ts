// A small pure string hash (64-bit FNV-1a over UTF-8) for identities such as plan ids.
// Not cryptographic: it only has to be stable across nodes and runs, and collide rarely by accident.

const FNV_OFFSET = 0xcbf29ce484222325n;
const FNV_PRIME = 0x100000001b3n;
const MASK_64 = 0xffffffffffffffffn;

// TextEncoder is a language-level global (no node: import), so the hash stays pure and portable.
const utf8 = new TextEncoder();

/** 64-bit FNV-1a of the UTF-8 bytes of `text`, as 16 lowercase hex digits. */
export function fnv1a64(text: string): string {
  let h = FNV_OFFSET;
  for (const byte of utf8.encode(text)) {
    h = ((h ^ BigInt(byte)) * FNV_PRIME) & MASK_64;
  }
  return h.toString(16).padStart(16, '0');
}
