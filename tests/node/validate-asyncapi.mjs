// Validates schemas/asyncapi.yaml with the AsyncAPI parser and compiles every message's wire schema:
//   node tests/node/validate-asyncapi.mjs [path]   -> exit 1 on any error or warning
import { fileURLToPath } from 'node:url';
import { describe, loadDocument, validators } from './contract.mjs';

const path = process.argv[2] ?? fileURLToPath(new URL('../../schemas/asyncapi.yaml', import.meta.url));
const { document, diagnostics, problems } = await loadDocument(path);
for (const d of diagnostics) console.error(describe(d));
if (!document || problems.length) {
  console.error(`${path}: invalid (${problems.length} errors or warnings)`);
  process.exit(1);
}
const channels = validators(document);
for (const [id, v] of Object.entries(channels)) console.log(`${id}: ${v.address} -> ${v.message}`);
console.log(`${path}: valid AsyncAPI ${document.version()}, ${Object.keys(channels).length} channels`);
