// A third-party signer written from docs/security.md alone: RFC 8785 (JCS) in a few lines of
// JavaScript (JSON.stringify writes numbers and strings as JCS requires; members are sorted by
// UTF-16 code units, which is what Array.prototype.sort compares), then Ed25519 over those bytes.
//   node jcs_sign.mjs canonicalize            < value.json   -> its JCS form
//   node jcs_sign.mjs sign KEY.pem KEY_ID      < command.json -> the command with `sig`
import { createPrivateKey, sign } from "node:crypto";
import { readFileSync } from "node:fs";

function canonicalize(value) {
  if (value === null || typeof value !== "object") return JSON.stringify(value);
  if (Array.isArray(value)) return "[" + value.map(canonicalize).join(",") + "]";
  return "{" + Object.keys(value).sort().map((k) => JSON.stringify(k) + ":" + canonicalize(value[k])).join(",") + "}";
}

const [mode, keyFile, keyId] = process.argv.slice(2);
const input = JSON.parse(readFileSync(0, "utf8"));
if (mode === "canonicalize") {
  process.stdout.write(canonicalize(input));
} else {
  delete input.sig;
  const value = sign(null, Buffer.from(canonicalize(input), "utf8"), createPrivateKey(readFileSync(keyFile)));
  input.sig = { key_id: keyId, alg: "ed25519", value: value.toString("base64") };
  process.stdout.write(JSON.stringify(input));
}
