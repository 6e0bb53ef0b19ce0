// A real OpenID provider for the test suite: node-oidc-provider, two issuers on
// 127.0.0.1 ("a" and "b") and a control port, all in one process.
//
// MEP_OIDC_MODULES names the node_modules directory that holds oidc-provider (.ci/run
// installs it under /var/tmp). Once every server listens, one JSON line goes to stdout:
//   {"issuers": {"a": "http://127.0.0.1:PORT", "b": ...}, "control": "http://127.0.0.1:PORT"}
//
// Clients of each issuer: "mep-service" (client credentials, secret "service-secret"),
// "mep-cli" (device flow and refresh tokens, public), "mepd" (introspection, secret
// "mepd-secret"). Resource "urn:mep:api" gives JWT access tokens for audience
// "mepd-api" (the default resource); "urn:mep:opaque" gives opaque ones for "mepd-opaque".
//
// Control routes (POST, loopback only, for the tests alone):
//   /<issuer>/rotate      a new signing key, first in the JWKS (the old one stays listed)
//   /<issuer>/retire      every key but the newest leaves the JWKS
//   /<issuer>/sign        {"claims": {...}, "header": {...}} signed with the newest key
//   /<issuer>/max-age     {"seconds": N}: the Cache-Control max-age of the JWKS answer
//   /<issuer>/down, /up   stop listening (connections refused) and listen again
//   /<issuer>/ttl         {"seconds": N}: access-token lifetime of tokens issued next
//   /<issuer>/hits        how many times the JWKS was fetched
import crypto from 'node:crypto';
import http from 'node:http';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

const modules = process.env.MEP_OIDC_MODULES;
if (!modules) {
  console.error('MEP_OIDC_MODULES is not set');
  process.exit(2);
}
const { default: Provider } = await import(
  pathToFileURL(path.join(modules, 'oidc-provider', 'lib', 'index.js')).href
);

const COOKIE_KEYS = [crypto.randomBytes(32).toString('hex')];
const RESOURCES = {
  'urn:mep:api': { audience: 'mepd-api', accessTokenFormat: 'jwt' },
  'urn:mep:opaque': { audience: 'mepd-opaque', accessTokenFormat: 'opaque' },
};

function newKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: crypto.randomUUID(), alg: 'RS256', use: 'sig' };
}

function b64url(data) {
  return Buffer.from(data).toString('base64url');
}

function sign(jwk, claims, header) {
  const head = { alg: 'RS256', kid: jwk.kid, typ: 'at+jwt', ...header };
  const input = `${b64url(JSON.stringify(head))}.${b64url(JSON.stringify(claims))}`;
  const key = crypto.createPrivateKey({ key: jwk, format: 'jwk' });
  return `${input}.${b64url(crypto.sign('sha256', Buffer.from(input), key))}`;
}

function configuration(issuer) {
  return {
    clients: [
      {
        client_id: 'mep-service',
        client_secret: 'service-secret',
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
      },
      {
        client_id: 'mep-cli',
        grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
        response_types: [],
        redirect_uris: [],
        token_endpoint_auth_method: 'none',
      },
      {
        client_id: 'mepd',
        client_secret: 'mepd-secret',
        grant_types: [],
        response_types: [],
        redirect_uris: [],
      },
    ],
    jwks: { keys: issuer.keys },
    cookies: { keys: COOKIE_KEYS },
    scopes: ['openid', 'offline_access', 'profile', 'email', 'mep'],
    claims: { openid: ['sub'], profile: ['preferred_username', 'name'], email: ['email'] },
    features: {
      devInteractions: { enabled: true },
      deviceFlow: { enabled: true },
      clientCredentials: { enabled: true },
      introspection: { enabled: true, allowedPolicy: async () => true },
      revocation: { enabled: true, allowedPolicy: async () => true },
      resourceIndicators: {
        enabled: true,
        // Device logins get the API by default; a client-credentials request without
        // a resource gets an opaque token with no audience.
        defaultResource: async (_ctx, client, oneOf) =>
          oneOf ?? (client.clientId === 'mep-cli' ? 'urn:mep:api' : undefined),
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resource) => {
          const info = RESOURCES[resource];
          if (!info) throw new Provider.errors.InvalidTarget();
          return {
            scope: 'mep',
            audience: info.audience,
            accessTokenFormat: info.accessTokenFormat,
            accessTokenTTL: issuer.ttl,
            jwt: { sign: { alg: 'RS256' } },
          };
        },
      },
    },
    // Access tokens carry the user's claims (the resource server has no userinfo call).
    extraTokenClaims: async (_ctx, token) =>
      token.accountId
        ? { preferred_username: token.accountId, email: `${token.accountId}@example.org` }
        : undefined,
    findAccount: async (_ctx, id) => ({
      accountId: id,
      claims: async () => ({ sub: id, preferred_username: id, email: `${id}@example.org` }),
    }),
    loadExistingGrant: async (ctx) => {
      // Consent is given once per client and account: the scripted login needs no
      // consent page (the access token still needs its resource granted).
      const grantId = ctx.oidc.result?.consent?.grantId
        || ctx.oidc.session.grantIdFor(ctx.oidc.client.clientId);
      if (grantId) return ctx.oidc.provider.Grant.find(grantId);
      const grant = new ctx.oidc.provider.Grant({
        clientId: ctx.oidc.client.clientId,
        accountId: ctx.oidc.session.accountId,
      });
      grant.addOIDCScope('openid offline_access profile email');
      grant.addResourceScope('urn:mep:api', 'mep');
      grant.addResourceScope('urn:mep:opaque', 'mep');
      await grant.save();
      return grant;
    },
    ttl: {
      AccessToken: () => issuer.ttl,
      ClientCredentials: () => issuer.ttl,
      DeviceCode: 600,
      IdToken: 300,
      RefreshToken: 3600,
      Grant: 3600,
      Interaction: 600,
      Session: 3600,
    },
    pkce: { required: () => false },
  };
}

function build(issuer) {
  const provider = new Provider(issuer.url, configuration(issuer));
  provider.proxy = false;
  provider.use(async (ctx, next) => {
    await next();
    if (ctx.path === '/jwks') {
      issuer.jwksHits += 1;
      ctx.set('Cache-Control', `public, max-age=${issuer.maxAge}`);
    }
  });
  issuer.callback = provider.callback();
}

async function listen(server, port) {
  await new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(port, '127.0.0.1', () => {
      server.off('error', reject);
      resolve();
    });
  });
  return server.address().port;
}

function makeIssuer() {
  const issuer = { keys: [newKey()], maxAge: 2, ttl: 300, port: 0, callback: null, jwksHits: 0 };
  issuer.server = http.createServer((req, res) => issuer.callback(req, res));
  return issuer;
}

const issuers = { a: makeIssuer(), b: makeIssuer() };
for (const issuer of Object.values(issuers)) {
  issuer.port = await listen(issuer.server, 0);
  issuer.url = `http://127.0.0.1:${issuer.port}`;
  build(issuer);
}

async function readJson(req) {
  let body = '';
  for await (const chunk of req) body += chunk;
  return body ? JSON.parse(body) : {};
}

async function control(issuer, action, body) {
  switch (action) {
    case 'rotate':
      issuer.keys = [newKey(), ...issuer.keys];
      build(issuer);
      break;
    case 'retire':
      issuer.keys = issuer.keys.slice(0, 1);
      build(issuer);
      break;
    case 'sign':
      return { token: sign(issuer.keys[0], body.claims ?? {}, body.header ?? {}) };
    case 'max-age':
      issuer.maxAge = Number(body.seconds);
      break;
    case 'hits':
      return { jwks: issuer.jwksHits };
    case 'ttl':
      issuer.ttl = Number(body.seconds);
      break;
    case 'down':
      if (issuer.server.listening) {
        await new Promise((resolve) => {
          issuer.server.close(resolve);
          issuer.server.closeAllConnections();
        });
      }
      break;
    case 'up':
      if (!issuer.server.listening) await listen(issuer.server, issuer.port);
      break;
    default:
      return null;
  }
  return { kids: issuer.keys.map((k) => k.kid), listening: issuer.server.listening };
}

const controlServer = http.createServer(async (req, res) => {
  const [, name, action] = req.url.split('/');
  const issuer = issuers[name];
  let answer = null;
  try {
    if (req.method === 'POST' && issuer) answer = await control(issuer, action, await readJson(req));
  } catch (err) {
    res.writeHead(500, { 'content-type': 'application/json' });
    res.end(JSON.stringify({ error: String(err) }));
    return;
  }
  res.writeHead(answer ? 200 : 404, { 'content-type': 'application/json' });
  res.end(JSON.stringify(answer ?? { error: 'no such route' }));
});
const controlPort = await listen(controlServer, 0);

process.stdout.write(
  `${JSON.stringify({
    issuers: Object.fromEntries(Object.entries(issuers).map(([n, i]) => [n, i.url])),
    control: `http://127.0.0.1:${controlPort}`,
  })}\n`,
);
for (const signal of ['SIGTERM', 'SIGINT']) process.on(signal, () => process.exit(0));
