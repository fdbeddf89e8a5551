"""A small Hub-compatible HTTP server on 127.0.0.1 for tests: the endpoints huggingface_hub 2.x uses to create a repo,
create a branch, validate card metadata, upload (preupload, then LFS batch + PUT, or Xet: write token + CAS xorbs and
shard) and commit, and download (resolve, model info, tree).

It is not the Hub: no auth model beyond "a token must be sent to write" (and to read a private repo), one namespace.
With `state.xet = True`, Xet is emulated both ways: uploaded xorbs are decoded back to files (LZ4 frames, byte grouping,
shard file records), and `resolve` advertises a Xet hash for such files so the client downloads them as CAS
reconstructions of xorb byte ranges. `state.xet = False` (the default) makes the server refuse Xet write tokens (501),
as a Hub without Xet would, and serves files from `resolve` alone. It records every request and can fail the next N matching requests with a status code."""
import base64, hashlib, json, re, struct, threading, time, uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


# ---- Xet: just enough of the CAS formats to turn uploaded xorbs + shard into file bytes (https://huggingface.co/docs/xet)

def xet_hex(raw: bytes) -> str:
    "Xet prints a 32-byte hash as four little-endian u64 words"
    return ''.join(raw[i:i+8][::-1].hex() for i in range(0, 32, 8))

def lz4_block(src: bytes, out: bytearray):
    "Decode one LZ4 block onto `out` (matches may reach into earlier blocks of the frame)"
    i, n = 0, len(src)
    while i < n:
        tok = src[i]
        i += 1
        lit = tok >> 4
        if lit == 15:
            while True:
                b = src[i]
                i += 1
                lit += b
                if b != 255: break
        out += src[i:i+lit]
        i += lit
        if i >= n: break
        off = src[i] | src[i+1] << 8
        i += 2
        ml = tok & 15
        if ml == 15:
            while True:
                b = src[i]
                i += 1
                ml += b
                if b != 255: break
        ml += 4
        start = len(out) - off
        if off >= ml: out += out[start:start+ml]
        else:
            for k in range(ml): out.append(out[start+k])

def lz4_frame(data: bytes) -> bytes:
    assert data[:4] == b'\x04\x22\x4d\x18', 'not an LZ4 frame'
    flg, i, out = data[4], 7 + (8 if data[4] & 0x08 else 0) + (4 if data[4] & 0x01 else 0), bytearray()
    while True:
        size = int.from_bytes(data[i:i+4], 'little')
        i += 4
        if size == 0: return bytes(out)
        blk = data[i:i+(size & 0x7fffffff)]
        i += size & 0x7fffffff
        if size & 0x80000000: out += blk
        else: lz4_block(blk, out)
        if flg & 0x10: i += 4

def bg4_join(data: bytes) -> bytes:
    "Undo byte grouping: group j holds bytes j, j+4, j+8, ... of the original"
    n, out, pos = len(data), bytearray(len(data)), 0
    for j in range(4):
        size = (n - j + 3) // 4
        out[j::4] = data[pos:pos+size]
        pos += size
    return bytes(out)

def xorb_chunks(xorb: bytes, n: int) -> list[bytes]:
    "The first `n` chunks of a xorb: 8-byte header (version, compressed len u24, scheme, raw len u24) + data"
    chunks, i = [], 0
    for _ in range(n):
        clen, scheme, ulen = int.from_bytes(xorb[i+1:i+4], 'little'), xorb[i+4], int.from_bytes(xorb[i+5:i+8], 'little')
        data = xorb[i+8:i+8+clen]
        i += 8 + clen
        raw = data if scheme == 0 else lz4_frame(data) if scheme == 1 else bg4_join(lz4_frame(data)) if scheme == 2 else None
        if raw is None or len(raw) != ulen: raise ValueError(f'cannot decode xorb chunk (scheme {scheme})')
        chunks.append(raw)
    return chunks

def xorb_offsets(xorb: bytes, n: int) -> list[int]:
    "Byte offset of each of the first `n` chunks in a xorb, and the end of the last one"
    offs = [0]
    for _ in range(n): offs.append(offs[-1] + 8 + int.from_bytes(xorb[offs[-1]+1:offs[-1]+4], 'little'))
    return offs

def shard_files(shard: bytes, xorbs: dict, records: dict | None = None) -> dict[str, bytes]:
    """sha256 hex -> file bytes for every file a shard describes (48-byte records; file section, then CAS section);
    `records` gets sha256 -> (xet file hash, [(xorb hash, first chunk, end chunk, bytes)])"""
    recs = [shard[i:i+48] for i in range(48, len(shard) - 47, 48)]
    files, i, end = [], 0, b'\xff' * 32
    while recs[i][:32] != end:
        flags, n = struct.unpack('<II', recs[i][32:40])
        entries = [struct.unpack('<IIII', r[32:48]) + (xet_hex(r[:32]),) for r in recs[i+1:i+1+n]]
        file_hash = xet_hex(recs[i][:32])
        i += 1 + n + (n if flags & 1 << 31 else 0)
        sha = None
        if flags & 1 << 30: sha, i = xet_hex(recs[i][:32]), i + 1
        files.append((sha, entries, file_hash))
    out = {}
    for sha, entries, file_hash in files:
        data = b''.join(b''.join(xorb_chunks(xorbs[h], end_)[start:end_]) for _, _, start, end_, h in entries)
        if sha is None or hashlib.sha256(data).hexdigest() != sha: raise ValueError('reconstructed file does not match its sha256')
        out[sha] = data
        if records is not None: records[sha] = (file_hash, [(h, start, end_, n) for _, n, start, end_, h in entries])
    return out


class Repo:
    def __init__(self, private):
        self.private, self.branches, self.commits = private, {'main': {}}, {'main': [self._sha()]}

    @staticmethod
    def _sha(): return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


class HubState:
    def __init__(self):
        self.repos, self.lfs, self.requests, self.failures, self.lock = {}, {}, [], [], threading.Lock()
        self.xet, self.xorbs, self.shards, self.xet_files = False, {}, [], {}

    def fail(self, times, status=500, path_re='.*'):
        "Answer the next `times` requests whose path matches `path_re` with `status`"
        self.failures.append([times, status, re.compile(path_re)])

    def take_failure(self, path):
        with self.lock:
            for f in self.failures:
                if f[0] > 0 and f[2].search(path):
                    f[0] -= 1
                    return f[1]


def _handler(state: HubState, base_url):
    class H(BaseHTTPRequestHandler):
        protocol_version = 'HTTP/1.1'
        def log_message(self, *a): pass

        # -- helpers
        def _send(self, status, body=b'', headers=None, ctype='application/json'):
            if isinstance(body, (dict, list)): body = json.dumps(body).encode()
            self.send_response(status)
            self.send_header('Content-Type', ctype)
            self.send_header('Content-Length', str(len(body)))
            for k, v in (headers or {}).items(): self.send_header(k, v)
            self.end_headers()
            if self.command != 'HEAD': self.wfile.write(body)

        def _error(self, status, msg, code=None):
            self._send(status, {'error': msg}, {'X-Error-Code': code, 'X-Error-Message': msg} if code else {'X-Error-Message': msg})

        def _body(self): return self.data

        def _authed(self): return (self.headers.get('Authorization') or '').startswith('Bearer ')

        def _route(self):
            path = urlparse(self.path).path
            n = int(self.headers.get('Content-Length') or 0)
            self.data = self.rfile.read(n) if n else b''  # always consumed, so a kept-alive connection stays in sync
            state.requests.append((self.command, path, self.headers.get('Authorization')))
            status = state.take_failure(path)
            if status: return self._error(status, f'injected failure {status}')
            for method, pat, fn in ROUTES:
                m = re.fullmatch(pat, path)
                if m and method == self.command: return fn(self, *[unquote(g) for g in m.groups()])
            self._error(404, f'no route for {self.command} {path}')

        do_GET = do_POST = do_PUT = do_HEAD = _route

        # -- repos
        def create_repo(self):
            if not self._authed(): return self._error(401, 'Invalid credentials: a token is required to create a repo')
            p = json.loads(self._body())
            repo_id = f"{p.get('organization') or 'user'}/{p['name']}"
            if repo_id in state.repos: return self._send(409, {'error': 'You already created this model repo', 'url': f'{base_url}/{repo_id}'})
            state.repos[repo_id] = Repo(p.get('visibility') == 'private' or p.get('private', False))
            self._send(200, {'url': f'{base_url}/{repo_id}', 'name': repo_id})

        def repo(self, repo_id):
            r = state.repos.get(repo_id)
            if r is None: self._error(404, f'Repository {repo_id} not found', 'RepoNotFound')
            return r

        def create_branch(self, repo_id, branch):
            if (r := self.repo(repo_id)) is None: return
            if branch in r.branches: return self._error(409, f'Branch {branch} already exists')
            r.branches[branch], r.commits[branch] = dict(r.branches['main']), [r.commits['main'][-1]]
            self._send(200, {})

        def _files(self, repo_id, rev):
            if (r := self.repo(repo_id)) is None: return None, None
            rev = 'main' if rev in (None, 'main') else rev
            for b, shas in r.commits.items():
                if rev in shas: rev = b
            if rev not in r.branches:
                self._error(404, f'Revision {rev} not found', 'RevisionNotFound')
                return None, None
            return r.branches[rev], r.commits[rev][-1]

        def model_info(self, repo_id, rev=None):
            files, sha = self._files(repo_id, rev)
            if files is None: return
            self._send(200, {'id': repo_id, 'modelId': repo_id, 'sha': sha, 'private': state.repos[repo_id].private,
                             'siblings': [{'rfilename': f} for f in sorted(files)], 'tags': [], 'downloads': 0, 'likes': 0})

        def tree(self, repo_id, rev, prefix=''):
            files, _ = self._files(repo_id, rev)
            if files is None: return
            prefix = prefix.strip('/')
            items = [{'type': 'file', 'path': f, 'size': len(d), 'oid': hashlib.sha1(d).hexdigest()}
                     for f, d in sorted(files.items()) if not prefix or f.startswith(prefix + '/')]
            self._send(200, items)

        # -- upload
        def preupload(self, repo_id, rev):
            if not self._authed(): return self._error(401, 'Invalid credentials')
            if self._files(repo_id, rev)[0] is None: return
            p = json.loads(self._body())
            modes = [{'path': f['path'], 'uploadMode': 'lfs' if f['size'] > 1024 or f['path'].endswith('.safetensors') else 'regular',
                      'shouldIgnore': False} for f in p['files']]
            self._send(200, {'files': modes, 'commitOid': state.repos[repo_id].commits['main'][-1]})

        def lfs_batch(self, repo_id):
            if not self._authed(): return self._error(401, 'Invalid credentials')
            p = json.loads(self._body())
            objs = [{'oid': o['oid'], 'size': o['size']} | ({} if o['oid'] in state.lfs else
                    {'actions': {'upload': {'href': f"{base_url}/_lfs/{o['oid']}"}}}) for o in p['objects']]
            self._send(200, {'transfer': 'basic', 'objects': objs})

        def lfs_put(self, oid):
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid: return self._error(400, 'sha256 mismatch')
            state.lfs[oid] = data
            self._send(200, b'', ctype='text/plain')

        def xet_token(self, repo_id, kind, rev):
            if state.xet:
                exp = str(int(time.time()) + 3600)
                body = {'casUrl': f'{base_url}/cas', 'accessToken': 'xet-token', 'exp': int(exp)}
                return self._send(200, body, {'X-Xet-Cas-Url': f'{base_url}/cas', 'X-Xet-Access-Token': 'xet-token', 'X-Xet-Token-Expiration': exp})
            self._error(501, 'Xet storage is not available on this test server')

        def commit(self, repo_id, rev):
            if not self._authed(): return self._error(401, 'Invalid credentials')
            files, _ = self._files(repo_id, rev)
            if files is None: return
            new, header = dict(files), None
            for line in self._body().decode().splitlines():
                op = json.loads(line)
                k, v = op['key'], op['value']
                if k == 'header': header = v
                elif k == 'file': new[v['path']] = base64.b64decode(v['content'])
                elif k == 'lfsFile':
                    if v['oid'] not in state.lfs: return self._error(422, f"LFS object {v['oid']} was never uploaded")
                    new[v['path']] = state.lfs[v['oid']]
                elif k == 'deletedFile': new.pop(v['path'], None)
                elif k == 'deletedFolder': new = {f: d for f, d in new.items() if not f.startswith(v['path'].rstrip('/') + '/')}
            r = state.repos[repo_id]
            branch = 'main' if rev in (None, 'main') else rev
            sha = Repo._sha()
            r.branches[branch] = new
            r.commits[branch].append(sha)
            r.messages = getattr(r, 'messages', []) + [header and header.get('summary')]
            self._send(200, {'commitUrl': f'{base_url}/{repo_id}/commit/{sha}', 'commitOid': sha, 'pullRequestUrl': None})

        def validate_yaml(self):
            "Like the Hub: the README's metadata must be a YAML mapping, and `base_model` a model id, never a path"
            import yaml
            text = json.loads(self._body())['content']
            m = re.match(r'^---\n(.*?)\n---', text, re.S)
            errors = []
            try: meta = yaml.safe_load(m.group(1)) if m else {}
            except yaml.YAMLError as e: meta, errors = {}, [{'message': f'invalid YAML: {e}'}]
            if not isinstance(meta, dict): errors.append({'message': 'metadata is not a mapping'})
            else:
                for b in [meta.get('base_model')] if isinstance(meta.get('base_model'), str) else meta.get('base_model') or []:
                    if not re.fullmatch(r'[\w.-]+(/[\w.-]+)?', b) or b.startswith('.'): errors.append({'message': f'"base_model" {b!r} is not a valid model id'})
            self._send(400 if errors else 200, {'errors': errors, 'warnings': []})

        # -- download
        def resolve(self, repo_id, rev, path):
            r = state.repos.get(repo_id)
            if r is not None and r.private and not self._authed(): return self._error(401, 'Invalid credentials', 'RepoNotFound')
            files, sha = self._files(repo_id, rev)
            if files is None: return
            if path not in files: return self._error(404, f'Entry {path} not found', 'EntryNotFound')
            data = files[path]
            etag = f'"{hashlib.sha256(data).hexdigest()}"'
            headers = {'X-Repo-Commit': sha, 'ETag': etag, 'X-Linked-Etag': etag, 'X-Linked-Size': str(len(data))}
            xet = state.xet_files.get(etag.strip('"')) if state.xet else None
            if xet:  # stored through Xet: the client may fetch it from CAS instead of this body
                headers |= {'X-Xet-Hash': xet[0], 'X-Xet-Refresh-Route': f'{base_url}/api/models/{repo_id}/xet-read-token/{sha}'}
            self._send(200, data, headers, ctype='application/octet-stream')

        def cas_xorb(self, prefix, h):
            if self.headers.get('Authorization') != 'Bearer xet-token': return self._error(401, 'bad CAS token')
            state.xorbs[h] = self.data
            self._send(200, {'was_inserted': True})

        def cas_shard(self):
            if self.headers.get('Authorization') != 'Bearer xet-token': return self._error(401, 'bad CAS token')
            state.shards.append(self.data)
            try: state.lfs.update(shard_files(self.data, state.xorbs, state.xet_files))  # committed files are then found by sha256
            except (ValueError, KeyError, IndexError, AssertionError) as e: return self._error(400, f'bad shard: {e}')
            self._send(200, {'result': 1})

        def cas_chunk(self, prefix, h): self._error(404, 'no such chunk')

        def cas_reconstruction(self, file_hash):
            "Which xorb byte ranges make up a file, as the Xet client downloads it"
            rec = next((r for r in state.xet_files.values() if r[0] == file_hash), None)
            if rec is None: return self._error(404, f'unknown file {file_hash}')
            terms, fetch = [], {}
            for h, start, end, n in rec[1]:
                offs = xorb_offsets(state.xorbs[h], end)
                terms.append({'hash': h, 'unpacked_length': n, 'range': {'start': start, 'end': end}})
                fetch.setdefault(h, []).append({'range': {'start': start, 'end': end}, 'url': f'{base_url}/cas/xorb/{h}',
                                                'url_range': {'start': offs[start], 'end': offs[end] - 1}})
            self._send(200, {'offset_into_first_range': 0, 'terms': terms, 'fetch_info': fetch})

        def cas_xorb_get(self, h):
            data = state.xorbs.get(h)
            if data is None: return self._error(404, 'no such xorb')
            m = re.fullmatch(r'bytes=(\d+)-(\d+)', self.headers.get('Range') or '')
            if m: self._send(206, data[int(m[1]):int(m[2]) + 1], {'Content-Range': f'bytes {m[1]}-{m[2]}/{len(data)}'}, ctype='application/octet-stream')
            else: self._send(200, data, ctype='application/octet-stream')

    R = r'([^/]+/[^/]+)'
    ROUTES = [('POST', r'/api/repos/create', H.create_repo),
              ('POST', r'/api/validate-yaml', H.validate_yaml),
              ('POST', rf'/api/models/{R}/branch/(.+)', H.create_branch),
              ('POST', rf'/api/models/{R}/preupload/(.+)', H.preupload),
              ('POST', rf'/api/models/{R}/commit/(.+)', H.commit),
              ('GET', rf'/api/models/{R}/xet-(read|write)-token/(.+)', H.xet_token),
              ('GET', rf'/api/models/{R}/revision/(.+)', H.model_info),
              ('GET', rf'/api/models/{R}/tree/([^/]+)/?(.*)', H.tree),
              ('GET', rf'/api/models/{R}', H.model_info),
              ('POST', rf'/{R}\.git/info/lfs/objects/batch', H.lfs_batch),
              ('PUT', r'/_lfs/([0-9a-f]+)', H.lfs_put),
              ('POST', r'/cas/v1/xorbs?/([^/]+)/([0-9a-f]+)', H.cas_xorb),
              ('POST', r'/cas/v1/shards', H.cas_shard),
              ('GET', r'/cas/v1/chunks?/([^/]+)/([0-9a-f]+)', H.cas_chunk),
              ('GET', r'/cas/v1/reconstructions/([0-9a-f]+)', H.cas_reconstruction),  # v2 answers 404: the client falls back to v1
              ('GET', r'/cas/xorb/([0-9a-f]+)', H.cas_xorb_get),
              ('HEAD', rf'/{R}/resolve/([^/]+)/(.+)', H.resolve),
              ('GET', rf'/{R}/resolve/([^/]+)/(.+)', H.resolve)]
    return H


class HubServer:
    "Start with `with HubServer() as hub:`; `hub.url` is the endpoint, `hub.state` what it holds and saw"
    def __init__(self):
        self.state = HubState()
        self.httpd = ThreadingHTTPServer(('127.0.0.1', 0), None)
        self.url = f'http://127.0.0.1:{self.httpd.server_address[1]}'
        self.httpd.RequestHandlerClass = _handler(self.state, self.url)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def files(self, repo_id, branch='main'): return self.state.repos[repo_id].branches[branch]


if __name__ == '__main__':
    with HubServer() as hub:
        print(hub.url, flush=True)
        while True: time.sleep(3600)
