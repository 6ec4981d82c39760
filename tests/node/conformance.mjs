// A camera and a consumer written in Node.js from the AsyncAPI document alone (ioredis + ajv):
//   node tests/node/conformance.mjs config.json
// It subscribes a camera on the control stream, publishes a clip's JPEG frames (plus a few bad
// entries the worker must dead-letter), waits for the worker's predictions, alerts and dead letters,
// and validates every entry of every stream against its wire schema from schemas/asyncapi.yaml.
// Prints a JSON summary (entries validated per stream); exits 1 on any invalid entry or a timeout.
//
// config.json: {redis_url, asyncapi, camera, keys: {frames, predictions, alerts, deadletter,
//   cameras}, frames_dir, fps, rules, timeout_seconds}
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import Redis from 'ioredis';
import { check, describe, fieldMap, loadDocument, readJson, validators } from './contract.mjs';

const config = readJson(process.argv[2]);
const { document, problems } = await loadDocument(config.asyncapi);
if (!document || problems.length) {
  console.error(problems.map(describe).join('\n'));
  process.exit(1);
}
const contract = validators(document);
const redis = new Redis(config.redis_url, { maxRetriesPerRequest: 3 });
const keys = config.keys;
const camera = config.camera;
const slotMs = 1000 / config.fps;
const deadline = Date.now() + config.timeout_seconds * 1000;
const expectedBad = new Map(); // "stream id" -> reason the worker should give
const schemaValid = new Set(); // of those, the ones only the worker can tell (an image that does not decode)
const failures = [];

// Checked before sending too: a client that validates what it writes finds its own bugs first.
function outgoing(channel, fields) {
  const asText = Object.fromEntries(
    Object.entries(fields).map(([k, v]) => [k, Buffer.isBuffer(v) ? v.toString('latin1') : v]),
  );
  return check(contract[channel], asText);
}

async function xadd(key, id, fields) {
  return redis.xadd(key, id, ...Object.entries(fields).flat());
}

async function waitFor(what, condition) {
  while (Date.now() < deadline) {
    if (await condition()) return;
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
  throw new Error(`timed out waiting for ${what}`);
}

// 1. Subscribe the camera, with alert rules.
const subscribe = { v: '1', action: 'subscribe', camera, fps: config.fps.toFixed(1), rules: JSON.stringify(config.rules) };
const subscribeErrors = outgoing('cameras', subscribe);
if (subscribeErrors.length) throw new Error(`own control message invalid: ${subscribeErrors}`);
await xadd(keys.cameras, '*', subscribe);
const badControl = await xadd(keys.cameras, '*', { v: '1', action: 'explode', camera });
expectedBad.set(`${keys.cameras} ${badControl}`, 'bad_type');

// 2. Publish the frames, each on its slot: the entry ID's time is the clock.
const files = readdirSync(config.frames_dir).filter((f) => f.endsWith('.jpg')).sort();
const start = Math.floor(Date.now() / slotMs) * slotMs - files.length * slotMs - 1000;
const bad = {
  3: [{ encoding: 'gif' }, 'bad_encoding'],
  5: [{ data: Buffer.from('not a jpeg') }, 'undecodable'],
  7: [{ seq: undefined }, 'missing_field'],
};
const wireValidReasons = new Set(['undecodable']);
for (const [seq, file] of files.entries()) {
  const ms = start + seq * slotMs;
  const frame = {
    v: '1', camera, seq: String(seq), capture_ms: String(ms), encoding: 'jpeg',
    data: readFileSync(join(config.frames_dir, file)),
  };
  const errors = outgoing('frames', frame);
  if (errors.length) throw new Error(`own frame ${seq} invalid: ${errors}`);
  await xadd(keys.frames, `${ms}-0`, frame);
  if (bad[seq]) {
    const [change, reason] = bad[seq];
    const broken = Object.fromEntries(
      Object.entries({ ...frame, ...change }).filter(([, v]) => v !== undefined),
    );
    const id = await xadd(keys.frames, `${ms}-1`, broken);
    expectedBad.set(`${keys.frames} ${id}`, reason);
    if (wireValidReasons.has(reason)) schemaValid.add(`${keys.frames} ${id}`);
  }
}

// 3. Wait for what the worker writes: a prediction per frame, the dead letters, and an alert
// closed by the camera going quiet.
const len = (key) => redis.xlen(key);
await waitFor(`${files.length} predictions`, async () => (await len(keys.predictions)) >= files.length);
await waitFor(`${expectedBad.size} dead letters`, async () => (await len(keys.deadletter)) >= expectedBad.size);
const closed = async () => (await redis.xrange(keys.alerts, '-', '+')).some(([, f]) => f.includes('close'));
await waitFor('an alert closed', closed);
await xadd(keys.cameras, '*', { v: '1', action: 'unsubscribe', camera });

// 4. Validate every entry of every stream, binary-safe, against the AsyncAPI document's schemas.
const summary = { asyncapi: document.version(), frames_published: files.length, streams: {} };
for (const [channel, key] of Object.entries(keys)) {
  const validator = contract[channel];
  const counts = { entries: 0, valid: 0, invalid_as_expected: 0 };
  for (const [idBuf, flat] of await redis.xrangeBuffer(key, '-', '+')) {
    const id = idBuf.toString();
    counts.entries += 1;
    let fields;
    let errors;
    try {
      fields = fieldMap(flat, validator.binary);
      errors = check(validator, fields);
    } catch (e) {
      errors = [`not UTF-8: ${e.message}`];
    }
    const expected = schemaValid.has(`${key} ${id}`) ? undefined : expectedBad.get(`${key} ${id}`);
    if (expected && errors.length) counts.invalid_as_expected += 1;
    else if (expected) failures.push(`${key} ${id}: valid, but the worker must reject it (${expected})`);
    else if (errors.length) failures.push(`${key} ${id}: ${errors.join('; ')}`);
    else counts.valid += 1;
    if (!errors.length && channel === 'predictions') {
      // The ID rules: entry ID = slot start, the slot on the entry-ID clock of the frame stream.
      if (id !== `${fields.start_ms}-0`) failures.push(`${key} ${id}: entry ID is not <start_ms>-0`);
      if (BigInt(fields.start_ms) !== BigInt(fields.slot) * BigInt(slotMs)) failures.push(`${key} ${id}: slot/start_ms`);
      if (fields.camera !== camera) failures.push(`${key} ${id}: camera ${fields.camera}`);
    }
    if (!errors.length && channel === 'deadletter') {
      const reason = expectedBad.get(`${fields.stream} ${fields.entry_id}`);
      if (reason !== fields.reason) failures.push(`${key} ${id}: unexpected dead letter ${fields.reason} for ${fields.entry_id}`);
      else expectedBad.set(`${fields.stream} ${fields.entry_id}`, `${reason} (dead-lettered)`);
    }
  }
  summary.streams[channel] = counts;
}
for (const [entry, reason] of expectedBad) {
  if (!reason.endsWith('(dead-lettered)')) failures.push(`${entry}: no dead letter (${reason})`);
}
const alerts = await redis.xrange(keys.alerts, '-', '+');
summary.alert_events = alerts.map(([, f]) => f[f.indexOf('event') + 1]);
summary.failures = failures;
console.log(JSON.stringify(summary));
redis.disconnect();
process.exit(failures.length ? 1 : 0);
