// The wire contract, read the way any client reads it: schemas/asyncapi.yaml through the AsyncAPI
// parser (which validates the document and resolves each message's wire schema), compiled with ajv.
import { readFileSync } from 'node:fs';
import { Parser, fromFile } from '@asyncapi/parser';
import Ajv from 'ajv';

// Parser diagnostics: 0 error, 1 warning, 2 information, 3 hint. Errors and warnings fail.
const FAILING = 1;

export async function loadDocument(path) {
  const { document, diagnostics } = await fromFile(new Parser(), path).parse();
  const problems = diagnostics.filter((d) => d.severity <= FAILING);
  return { document, diagnostics, problems };
}

export function describe(d) {
  return `${['error', 'warning', 'info', 'hint'][d.severity]} ${d.code} at ${d.path.join('.') || '/'}: ${d.message}`;
}

// The parser marks every schema it saw with x-parser-* keys; a validator need not know them.
function clean(value) {
  if (Array.isArray(value)) return value.map(clean);
  if (value && typeof value === 'object') {
    return Object.fromEntries(
      Object.entries(value).filter(([k]) => !k.startsWith('x-parser-')).map(([k, v]) => [k, clean(v)]),
    );
  }
  return value;
}

// One validator per channel: the entry's wire schema plus one per JSON field (its contentSchema),
// which JSON Schema leaves as an annotation and the client applies after JSON.parse.
export function validators(document) {
  const ajv = new Ajv({ allErrors: true });
  const out = {};
  for (const channel of document.channels()) {
    const [message] = channel.messages();
    const schema = clean(message.payload().json().schema ?? message.payload().json());
    const wire = ajv.compile(schema);
    const json = {};
    const binary = new Set();
    for (const [name, prop] of Object.entries(schema.properties)) {
      if (prop.contentMediaType === 'application/json') {
        json[name] = ajv.compile({ ...prop.contentSchema, definitions: schema.definitions ?? {} });
      }
      if (prop.contentEncoding === 'binary') binary.add(name);
    }
    out[channel.id()] = { address: channel.address(), message: message.id(), wire, json, binary };
  }
  return out;
}

// An entry as ioredis' xrangeBuffer returns it ([id, [k1, v1, k2, v2, ...]] of Buffers) -> field map
// of strings: UTF-8 (refusing invalid bytes), binary fields one character per byte.
const utf8 = new TextDecoder('utf-8', { fatal: true });
export function fieldMap(flat, binary) {
  const fields = {};
  for (let i = 0; i < flat.length; i += 2) {
    const name = utf8.decode(flat[i]);
    fields[name] = binary.has(name) ? flat[i + 1].toString('latin1') : utf8.decode(flat[i + 1]);
  }
  return fields;
}

// Errors of one entry against its channel's contract; [] when valid.
export function check(validator, fields) {
  const errors = [];
  if (!validator.wire(fields)) errors.push(...validator.wire.errors.map((e) => `${e.instancePath || '/'} ${e.message}`));
  for (const [name, validate] of Object.entries(validator.json)) {
    if (!(name in fields)) continue;
    let value;
    try {
      value = JSON.parse(fields[name]);
    } catch (e) {
      errors.push(`/${name} is not JSON: ${e.message}`);
      continue;
    }
    if (!validate(value)) errors.push(...validate.errors.map((e) => `/${name}${e.instancePath} ${e.message}`));
  }
  return errors;
}

export const readJson = (path) => JSON.parse(readFileSync(path, 'utf8'));
