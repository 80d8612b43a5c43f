/* Capture's hot path in C, for pgoutput and wal2json.
 *
 * tuple_tokens: pgoutput's TupleData -> the JSON tokens of its values; the same function as
 * undo.stream.pgoutput._py_tuple.
 *
 * stage, stage_wal2json: one XLogData frame holding an insert, an update with its full old row,
 * or a delete with its full old row, of a table capture has resolved -> the nine values of its
 * row in the store, appended to the writer's staged list, and its count; the same as decoding
 * it (PgOutputDecoder.decode, Wal2JsonDecoder.decode) and StoreWriter.add. A change of a table
 * capture does not audit is dropped. Anything else (other messages, a table not resolved yet,
 * an old row missing or key-only, a TOASTed value left unchanged, text that is not UTF-8) is
 * left untouched, and capture takes the Python path.
 *
 * The Python code stays the reference and the fallback where this module was not built;
 * tests/unit/test_speedups.py holds them equal. A token is what json.encoder.encode_basestring
 * makes of the value's text: the UTF-8 bytes as sent, between quotes, with '"', '\\' and
 * control characters escaped; "null" for a NULL or an unchanged TOASTed value.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

static PyObject *null_token; /* "null" */
static PyObject *no_value;   /* "": a NULL staged for the store (StoreWriter's NULL) */
static PyObject *op_insert, *op_update, *op_delete;

/* -- growable byte buffers; the GIL is held throughout ------------------------------------ */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

static int
reserve(Buf *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap)
        return 0;
    Py_ssize_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + extra)
        cap *= 2;
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* scratch space, kept between calls; a buffer a huge value grew is given back after the call */
static Buf k;                                   /* a key */
static Buf scratch_text, value_text;            /* a wal2json member name, a value's text */
static Buf name, type, schema, table;           /* wal2json fields */
static Buf new_sig, old_sig, full;              /* wal2json table signatures */

#define KEEP_BYTES (1 << 20)

static void
give_back(Buf *b)
{
    if (b->cap > KEEP_BYTES) {
        PyMem_Free(b->p);
        b->p = NULL;
        b->cap = b->len = 0;
    }
}

/* the buffer holds exactly this word */
static int
is(const Buf *b, const char *word)
{
    size_t n = strlen(word);
    return (size_t)b->len == n && memcmp(b->p, word, n) == 0;
}

static const char hexdigits[] = "0123456789abcdef";

/* append the JSON token of n bytes of UTF-8 text */
static int
put_token(Buf *b, const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t extra = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\')
            extra += 1;
        else if (c < 0x20)
            extra += (c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t') ? 1 : 5;
    }
    if (reserve(b, n + extra + 2) < 0)
        return -1;
    char *out = b->p;
    Py_ssize_t o = b->len;
    out[o++] = '"';
    if (extra == 0) {
        memcpy(out + o, s, (size_t)n);
        o += n;
    }
    else {
        for (Py_ssize_t i = 0; i < n; i++) {
            unsigned char c = s[i];
            if (c == '"' || c == '\\') {
                out[o++] = '\\';
                out[o++] = (char)c;
            }
            else if (c >= 0x20) {
                out[o++] = (char)c;
            }
            else {
                out[o++] = '\\';
                switch (c) {
                case '\b': out[o++] = 'b'; break;
                case '\f': out[o++] = 'f'; break;
                case '\n': out[o++] = 'n'; break;
                case '\r': out[o++] = 'r'; break;
                case '\t': out[o++] = 't'; break;
                default:
                    out[o++] = 'u';
                    out[o++] = '0';
                    out[o++] = '0';
                    out[o++] = hexdigits[c >> 4];
                    out[o++] = hexdigits[c & 0xF];
                }
            }
        }
    }
    out[o++] = '"';
    b->len = o;
    return 0;
}

static int
put(Buf *b, const char *s, Py_ssize_t n)
{
    if (n == 0)
        return 0;
    if (reserve(b, n) < 0)
        return -1;
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

/* strict UTF-8, as bytes.decode() in the Python version: the same UnicodeDecodeError */
static PyObject *
text(const Buf *b, Py_ssize_t from, Py_ssize_t to)
{
    return PyUnicode_DecodeUTF8(b->p + from, to - from, NULL);
}

/* -- TupleData ---------------------------------------------------------------------------- */

#define MAX_COLUMNS 1664 /* PostgreSQL's MaxTupleAttributeNumber */

/* A row image as the store keeps it, "[tok,tok,...]", and where each token is in it. */
typedef struct {
    Buf out;                           /* the image */
    Py_ssize_t n;                      /* columns */
    Py_ssize_t start[MAX_COLUMNS + 1]; /* token i is out[start[i]:start[i + 1] - 1]; start[n]
                                          is out.len (each token is followed by ',' or ']') */
    unsigned char kind[MAX_COLUMNS];   /* pgoutput's 't', 'n' or 'u' */
    Py_ssize_t unchanged;              /* how many 'u': TOASTed values left unchanged */
} Tuple;

static int
open_image(Tuple *t)
{
    t->out.len = t->n = t->unchanged = 0;
    return put(&t->out, "[", 1);
}

/* before a token */
static int
next_token(Tuple *t)
{
    if (t->n >= MAX_COLUMNS) {
        PyErr_Format(PyExc_ValueError, "a row of more than %d columns", MAX_COLUMNS);
        return -1;
    }
    if (t->n > 0 && put(&t->out, ",", 1) < 0)
        return -1;
    t->start[t->n++] = t->out.len;
    return 0;
}

static int
close_image(Tuple *t)
{
    if (put(&t->out, "]", 1) < 0)
        return -1;
    t->start[t->n] = t->out.len;
    return 0;
}

/* parse TupleData at *pos into t; -1 with ValueError when malformed or truncated */
static int
parse_tuple(Tuple *t, const unsigned char *buf, Py_ssize_t size, Py_ssize_t *pos)
{
    Py_ssize_t p = *pos;
    if (open_image(t) < 0)
        return -1;
    if (p < 0 || p + 2 > size)
        goto truncated;
    Py_ssize_t n = ((Py_ssize_t)buf[p] << 8) | buf[p + 1];
    p += 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (p >= size)
            goto truncated;
        unsigned char kind = buf[p];
        if (kind != 't' && kind != 'n' && kind != 'u') {
            PyErr_Format(PyExc_ValueError, "pgoutput: unexpected tuple column kind '%c'", kind);
            return -1;
        }
        if (next_token(t) < 0)
            return -1;
        t->kind[i] = kind;
        if (kind == 't') {
            if (p + 5 > size)
                goto truncated;
            uint32_t len = ((uint32_t)buf[p + 1] << 24) | ((uint32_t)buf[p + 2] << 16)
                           | ((uint32_t)buf[p + 3] << 8) | (uint32_t)buf[p + 4];
            p += 5;
            if (len > 0x7FFFFFFF || (Py_ssize_t)len > size - p)
                goto truncated;
            if (put_token(&t->out, buf + p, (Py_ssize_t)len) < 0)
                return -1;
            p += (Py_ssize_t)len;
        }
        else {
            p += 1;
            t->unchanged += kind == 'u';
            if (put(&t->out, "null", 4) < 0)
                return -1;
        }
    }
    if (close_image(t) < 0)
        return -1;
    *pos = p;
    return 0;
truncated:
    PyErr_SetString(PyExc_ValueError, "pgoutput: truncated tuple data");
    return -1;
}

static Tuple old_tuple, new_tuple;

static void
give_back_all(void)
{
    Buf *all[] = {&k, &scratch_text, &value_text, &name, &type, &schema, &table, &new_sig,
                  &old_sig, &full, &old_tuple.out, &new_tuple.out};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        give_back(all[i]);
}

/* tuple_tokens(buf: bytes, pos: int) -> (tokens, unchanged positions or None, next position) */
static PyObject *
tuple_tokens(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "tuple_tokens(buf: bytes, pos: int)");
        return NULL;
    }
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    Tuple *t = &new_tuple;
    if (parse_tuple(t, (const unsigned char *)PyBytes_AS_STRING(args[0]),
                    PyBytes_GET_SIZE(args[0]), &pos) < 0)
        return NULL;
    PyObject *values = PyList_New(t->n);
    PyObject *unchanged = NULL;
    if (values == NULL)
        return NULL;
    if (t->unchanged && (unchanged = PyList_New(0)) == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < t->n; i++) {
        PyObject *v = t->kind[i] == 't' ? text(&t->out, t->start[i], t->start[i + 1] - 1)
                                        : Py_NewRef(null_token);
        if (v == NULL)
            goto error;
        PyList_SET_ITEM(values, i, v);
        if (t->kind[i] == 'u') {
            PyObject *at = PyLong_FromSsize_t(i);
            if (at == NULL || PyList_Append(unchanged, at) < 0) {
                Py_XDECREF(at);
                goto error;
            }
            Py_DECREF(at);
        }
    }
    PyObject *result = Py_BuildValue("(NOn)", values, unchanged ? unchanged : Py_None, pos);
    Py_XDECREF(unchanged);
    give_back_all();
    return result;
error:
    Py_DECREF(values);
    Py_XDECREF(unchanged);
    give_back_all();
    return NULL;
}

/* -- stage -------------------------------------------------------------------------------- */

static uint32_t
be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* the whole image as the store keeps it */
static PyObject *
image(Tuple *t)
{
    return text(&t->out, 0, t->out.len);
}

/* the key's values as the store keeps them: "[tok,...]"; NULL with no error: not possible */
static PyObject *
key_of(Tuple *t, PyObject *positions)
{
    k.len = 0;
    if (put(&k, "[", 1) < 0)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(positions);
    for (Py_ssize_t j = 0; j < n; j++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyTuple_GET_ITEM(positions, j));
        if (i == -1 && PyErr_Occurred())
            return NULL;
        if (i < 0 || i >= t->n)
            return NULL;
        if ((j && put(&k, ",", 1) < 0)
            || put(&k, t->out.p + t->start[i], t->start[i + 1] - 1 - t->start[i]) < 0)
            return NULL;
    }
    if (put(&k, "]", 1) < 0)
        return NULL;
    return text(&k, 0, k.len);
}

/* resolved[name] -> its store id and key positions (borrowed): 1, 0 when not there, -1 error */
static int
resolved_entry(PyObject *resolved, PyObject *name, PyObject **store_id, PyObject **positions)
{
    PyObject *entry = PyDict_GetItemWithError(resolved, name);
    if (entry == NULL)
        return PyErr_Occurred() ? -1 : 0;
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 2
        || (PyTuple_GET_ITEM(entry, 1) != Py_None && !PyTuple_Check(PyTuple_GET_ITEM(entry, 1)))) {
        PyErr_SetString(PyExc_TypeError, "stage: resolved values are (store id, key positions)");
        return -1;
    }
    *store_id = PyTuple_GET_ITEM(entry, 0);
    *positions = PyTuple_GET_ITEM(entry, 1);
    return 1;
}

/* append the change's nine values to rows and count it in counts[store id, op]: all or
 * nothing (args: the stage functions' change_id, txn_id, ord) */
static int
emit(PyObject *rows, PyObject *counts, PyObject *const *ids, PyObject *store_id, PyObject *op,
     PyObject *key, PyObject *old, PyObject *new)
{
    PyObject *values[9] = {
        ids[0], ids[1], ids[2], store_id, op, key,
        old ? old : no_value, new ? new : no_value, no_value,
    };
    Py_ssize_t before = PyList_GET_SIZE(rows);
    PyObject *count_key = PyTuple_Pack(2, store_id, op), *next = NULL;
    if (count_key == NULL)
        return -1;
    for (int i = 0; i < 9; i++)
        if (PyList_Append(rows, values[i]) < 0)
            goto error;
    PyObject *count = PyDict_GetItemWithError(counts, count_key);
    long n = 0;
    if (count == NULL && PyErr_Occurred())
        goto error;
    if (count != NULL && (n = PyLong_AsLong(count)) == -1 && PyErr_Occurred())
        goto error;
    if ((next = PyLong_FromLong(n + 1)) == NULL || PyDict_SetItem(counts, count_key, next) < 0)
        goto error;
    Py_DECREF(next);
    Py_DECREF(count_key);
    return 0;
error:
    Py_XDECREF(next);
    Py_DECREF(count_key);
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (PyList_SetSlice(rows, before, PyList_GET_SIZE(rows), NULL) < 0) {
        /* out of memory taking the part back: rows keeps part of a change. Its MemoryError,
         * set now, replaces the first error: either stops capture before rows are written */
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    PyErr_Restore(type, value, tb);
    return -1;
}

/* What a reader makes of one change message, for stage_frame. */
typedef struct {
    PyObject *op;     /* op_insert, op_update or op_delete (borrowed) */
    PyObject *name;   /* the table version's name in resolved (a new reference) */
    Tuple *key_from;  /* the tuple holding the key: the new row, the old one for a delete */
} Change;

/* 1: a change stage takes (r filled in), 0: one it leaves to the Python path (an error set
 * then is cleared, but for MemoryError), -1: an error */
typedef int (*reader)(const unsigned char *msg, Py_ssize_t size, Change *r);

/* pgoutput: an insert, or an update or delete with its full old row ('O'), and no unchanged
 * TOASTed value (the Python path lists those); named by its relation OID */
static int
read_pgoutput(const unsigned char *msg, Py_ssize_t size, Change *r)
{
    if (size < 7)
        return 0;
    Py_ssize_t pos = 6;
    switch (msg[0]) {
    case 'I':
        if (msg[5] != 'N' || parse_tuple(&new_tuple, msg, size, &pos) < 0)
            return 0;
        r->op = op_insert, r->key_from = &new_tuple;
        break;
    case 'U':
        if (msg[5] != 'O' || parse_tuple(&old_tuple, msg, size, &pos) < 0 || pos >= size
            || msg[pos] != 'N')
            return 0;
        pos += 1;
        if (parse_tuple(&new_tuple, msg, size, &pos) < 0 || new_tuple.unchanged)
            return 0;
        r->op = op_update, r->key_from = &new_tuple;
        break;
    case 'D':
        if (msg[5] != 'O' || parse_tuple(&old_tuple, msg, size, &pos) < 0)
            return 0;
        r->op = op_delete, r->key_from = &old_tuple;
        break;
    default:
        return 0;
    }
    r->name = PyLong_FromUnsignedLong(be32(msg + 1));
    return r->name == NULL ? -1 : 1;
}

/* -- wal2json (format-version 2) ------------------------------------------------------------
 *
 * A JSON reader for one wal2json document, strict where json.loads is: anything it does not
 * take as the Python path would (a constant such as NaN, a lone surrogate, a control
 * character in a string, trailing text, a value that is an object) leaves the change to the
 * Python path, which then says what is wrong with it.
 */

typedef struct {
    const unsigned char *p, *end;
} Json;

static void
ws(Json *j)
{
    while (j->p < j->end && (*j->p == ' ' || *j->p == '\t' || *j->p == '\n' || *j->p == '\r'))
        j->p++;
}

/* after a member or an element: 1 on ',' (another follows), 0 on the closing character, -1
 * on anything else */
static int
more(Json *j, unsigned char close)
{
    ws(j);
    if (j->p < j->end && (*j->p == ',' || *j->p == close)) {
        int comma = *j->p == ',';
        j->p++;
        ws(j);
        return comma;
    }
    return -1;
}

static int
lit(Json *j, const char *word)
{
    size_t n = strlen(word);
    if ((size_t)(j->end - j->p) < n || memcmp(j->p, word, n) != 0)
        return -1;
    j->p += n;
    return 0;
}

static int
hex4(const unsigned char *p, unsigned *out)
{
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        unsigned char c = p[i];
        v <<= 4;
        if (c >= '0' && c <= '9')
            v |= c - '0';
        else if (c >= 'a' && c <= 'f')
            v |= c - 'a' + 10;
        else if (c >= 'A' && c <= 'F')
            v |= c - 'A' + 10;
        else
            return -1;
    }
    *out = v;
    return 0;
}

/* a JSON string at j->p (the opening quote) -> its UTF-8 bytes appended to out */
static int
string(Json *j, Buf *out)
{
    if (j->p >= j->end || *j->p != '"')
        return -1;
    j->p++;
    for (;;) {
        const unsigned char *run = j->p;
        while (j->p < j->end && *j->p != '"' && *j->p != '\\' && *j->p >= 0x20)
            j->p++;
        if (put(out, (const char *)run, j->p - run) < 0)
            return -2;
        if (j->p >= j->end || *j->p < 0x20)
            return -1;
        if (*j->p == '"') {
            j->p++;
            return 0;
        }
        /* an escape */
        if (j->end - j->p < 2)
            return -1;
        unsigned char e = j->p[1];
        char c;
        j->p += 2;
        switch (e) {
        case '"': c = '"'; break;
        case '\\': c = '\\'; break;
        case '/': c = '/'; break;
        case 'b': c = '\b'; break;
        case 'f': c = '\f'; break;
        case 'n': c = '\n'; break;
        case 'r': c = '\r'; break;
        case 't': c = '\t'; break;
        case 'u': {
            unsigned cp;
            if (j->end - j->p < 4 || hex4(j->p, &cp) < 0)
                return -1;
            j->p += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                unsigned lo;
                if (j->end - j->p < 6 || j->p[0] != '\\' || j->p[1] != 'u'
                    || hex4(j->p + 2, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF)
                    return -1; /* a lone surrogate: the Python path */
                j->p += 6;
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            }
            else if (cp >= 0xDC00 && cp <= 0xDFFF) {
                return -1;
            }
            char u[4];
            Py_ssize_t n;
            if (cp < 0x80) {
                u[0] = (char)cp;
                n = 1;
            }
            else if (cp < 0x800) {
                u[0] = (char)(0xC0 | (cp >> 6));
                u[1] = (char)(0x80 | (cp & 0x3F));
                n = 2;
            }
            else if (cp < 0x10000) {
                u[0] = (char)(0xE0 | (cp >> 12));
                u[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
                u[2] = (char)(0x80 | (cp & 0x3F));
                n = 3;
            }
            else {
                u[0] = (char)(0xF0 | (cp >> 18));
                u[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
                u[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
                u[3] = (char)(0x80 | (cp & 0x3F));
                n = 4;
            }
            if (put(out, u, n) < 0)
                return -2;
            continue;
        }
        default:
            return -1;
        }
        if (put(out, &c, 1) < 0)
            return -2;
    }
}

/* an object's member name and its ':' -> the name's UTF-8 in scratch_text */
static int
member(Json *j)
{
    scratch_text.len = 0;
    if (string(j, &scratch_text) < 0)
        return -1;
    ws(j);
    if (j->p >= j->end || *j->p != ':')
        return -1;
    j->p++;
    ws(j);
    return 0;
}

/* a JSON number (json.loads' grammar; no NaN or Infinity) */
static int
number(Json *j)
{
    const unsigned char *p = j->p, *e = j->end;
    if (p < e && *p == '-')
        p++;
    if (p < e && *p == '0')
        p++;
    else if (p < e && *p >= '1' && *p <= '9')
        while (p < e && *p >= '0' && *p <= '9')
            p++;
    else
        return -1;
    if (p < e && *p == '.') {
        const unsigned char *d = ++p;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
        if (p == d)
            return -1;
    }
    if (p < e && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < e && (*p == '+' || *p == '-'))
            p++;
        const unsigned char *d = p;
        while (p < e && *p >= '0' && *p <= '9')
            p++;
        if (p == d)
            return -1;
    }
    j->p = p;
    return 0;
}

static int skip(Json *j, int depth);

static int
skip_container(Json *j, int depth, unsigned char close)
{
    j->p++;
    ws(j);
    if (j->p < j->end && *j->p == close) {
        j->p++;
        return 0;
    }
    for (;;) {
        if (close == '}' && member(j) < 0)
            return -1;
        if (skip(j, depth + 1) < 0)
            return -1;
        int m = more(j, close);
        if (m <= 0)
            return m;
    }
}

/* any JSON value, not kept */
static int
skip(Json *j, int depth)
{
    ws(j);
    if (j->p >= j->end || depth > 64)
        return -1;
    switch (*j->p) {
    case '"':
        scratch_text.len = 0;
        return string(j, &scratch_text) < 0 ? -1 : 0;
    case '{':
        return skip_container(j, depth, '}');
    case '[':
        return skip_container(j, depth, ']');
    case 't':
        return lit(j, "true");
    case 'f':
        return lit(j, "false");
    case 'n':
        return lit(j, "null");
    default:
        return number(j);
    }
}

/* one column object -> its name appended to sig (after a NUL) and its value's token to t */
static int
column(Json *j, Tuple *t, Buf *sig)
{
    /* the value: 'n' none or null, 't' true, 'f' false, '"' a string (its text in value_text),
     * '0' a number (its digits in value_text) */
    unsigned char value = 'n';
    int have_name = 0, have_type = 0;
    name.len = type.len = 0;
    if (j->p >= j->end || *j->p != '{')
        return -1;
    j->p++;
    ws(j);
    if (j->p < j->end && *j->p == '}')
        return -1;
    for (;;) {
        if (member(j) < 0)
            return -1;
        if (is(&scratch_text, "name")) {
            name.len = 0;
            if (string(j, &name) < 0)
                return -1;
            have_name = 1;
        }
        else if (is(&scratch_text, "type")) {
            type.len = 0;
            if (string(j, &type) < 0)
                return -1;
            have_type = 1;
        }
        else if (is(&scratch_text, "value")) {
            const unsigned char *from = j->p;
            value_text.len = 0;
            if (from < j->end && *from == '"') {
                if (string(j, &value_text) < 0)
                    return -1;
                value = '"';
            }
            else if (from < j->end && (*from == '-' || (*from >= '0' && *from <= '9'))) {
                if (number(j) < 0 || put(&value_text, (const char *)from, j->p - from) < 0)
                    return -1;
                value = '0';
            }
            else if (from < j->end && (*from == 't' || *from == 'f' || *from == 'n')) {
                if (skip(j, 1) < 0)
                    return -1;
                value = *from;
            }
            else {
                return -1; /* an object, an array or a constant: not a column value */
            }
        }
        else if (skip(j, 1) < 0) {
            return -1;
        }
        int m = more(j, '}');
        if (m < 0)
            return -1;
        if (m == 0)
            break;
    }
    if (!have_name || next_token(t) < 0)
        return -1;
    if (put(sig, "\0", 1) < 0 || put(sig, name.p, name.len) < 0)
        return -1;
    /* the value's token, as wal2json._tokens makes it */
    if (value == 'n') /* missing: c.get("value") is None */
        return put(&t->out, "null", 4);
    if (value == 't' || value == 'f')
        return put(&t->out, value == 't' ? "\"t\"" : "\"f\"", 3);
    /* a string, or a number as its exact digits: text (with parse_int and parse_float = str,
     * both are str in Python), and a bytea's text gets its '\\x' back */
    if (!have_type)
        return -1; /* c["type"] is asked for: the Python path */
    if (!is(&type, "bytea"))
        return put_token(&t->out, (const unsigned char *)value_text.p, value_text.len);
    scratch_text.len = 0;
    if (put(&scratch_text, "\\x", 2) < 0 || put(&scratch_text, value_text.p, value_text.len) < 0)
        return -1;
    return put_token(&t->out, (const unsigned char *)scratch_text.p, scratch_text.len);
}

/* an array of columns -> t (the image) and sig (NUL and each name) */
static int
columns(Json *j, Tuple *t, Buf *sig)
{
    if (open_image(t) < 0)
        return -1;
    ws(j);
    if (j->p >= j->end || *j->p != '[')
        return -1;
    j->p++;
    ws(j);
    if (j->p < j->end && *j->p == ']') {
        j->p++;
        return close_image(t);
    }
    for (;;) {
        if (column(j, t, sig) < 0)
            return -1;
        int m = more(j, ']');
        if (m < 0)
            return -1;
        if (m == 0)
            return close_image(t);
    }
}

/* wal2json: an insert, an update whose new row has the old row's columns, or a delete, in a
 * document json.loads would read the same; named by wal2json.signature's bytes */
static int
read_wal2json(const unsigned char *msg, Py_ssize_t size, Change *r)
{
    Json j = {msg, msg + size};
    unsigned char action = 0;
    int have_new = 0, have_old = 0;
    schema.len = table.len = new_sig.len = old_sig.len = 0;
    if (j.p >= j.end || *j.p != '{') /* json.loads' scanner takes no leading space either */
        return 0;
    j.p++;
    ws(&j);
    for (;;) {
        if (member(&j) < 0)
            return 0;
        if (is(&scratch_text, "action")) {
            scratch_text.len = 0;
            if (string(&j, &scratch_text) < 0 || scratch_text.len != 1)
                return 0;
            action = (unsigned char)scratch_text.p[0];
        }
        else if (is(&scratch_text, "schema")) {
            schema.len = 0;
            if (string(&j, &schema) < 0)
                return 0;
        }
        else if (is(&scratch_text, "table")) {
            table.len = 0;
            if (string(&j, &table) < 0)
                return 0;
        }
        else if (is(&scratch_text, "columns")) {
            new_sig.len = 0;
            if (columns(&j, &new_tuple, &new_sig) < 0)
                return 0;
            have_new = 1;
        }
        else if (is(&scratch_text, "identity")) {
            old_sig.len = 0;
            if (columns(&j, &old_tuple, &old_sig) < 0)
                return 0;
            have_old = 1;
        }
        else if (skip(&j, 1) < 0) {
            return 0;
        }
        int m = more(&j, '}');
        if (m < 0)
            return 0;
        if (m == 0)
            break;
    }
    if (j.p != j.end || j.p[-1] != '}')
        return 0; /* json.loads takes one document and nothing after it, not even a space */
    Buf *sig;
    if (action == 'I' && have_new) {
        r->op = op_insert, r->key_from = &new_tuple, sig = &new_sig;
    }
    else if (action == 'U' && have_new && have_old && old_tuple.n > 0
             && old_tuple.n == new_tuple.n && old_sig.len == new_sig.len
             && memcmp(old_sig.p, new_sig.p, (size_t)old_sig.len) == 0) {
        r->op = op_update, r->key_from = &new_tuple, sig = &old_sig;
    }
    else if (action == 'D' && have_old && old_tuple.n > 0) {
        r->op = op_delete, r->key_from = &old_tuple, sig = &old_sig;
    }
    else {
        return 0;
    }
    full.len = 0;
    if (put(&full, schema.p, schema.len) < 0 || put(&full, "\0", 1) < 0
        || put(&full, table.p, table.len) < 0 || put(&full, sig->p, sig->len) < 0)
        return 0;
    r->name = PyBytes_FromStringAndSize(full.p, full.len);
    return r->name == NULL ? -1 : 1;
}

/* stage(frame, resolved, rows, counts, change_id, txn_id, ord) -> 0, 1 or 2, for one decoder
 *
 * frame: an XLogData message as libpq hands it over ('w', three 8-byte fields, the decoder's
 * message). resolved: {name: (store id, key positions or None)} of the table versions capture
 * resolved as audited with complete old rows, and {name: (None, None)} of those it does not
 * audit. For a change the reader takes, of an audited table in resolved, rows gets
 * (change_id, txn_id, ord, store id, op, key, old, new, unchanged), '' for each NULL,
 * counts[store id, op] goes up by one, and the answer is 1; of a table not audited, 2 and
 * nothing else. Anything else is 0, with nothing touched: the Python path takes it (text that
 * is not UTF-8 too: it raises there).
 */
static PyObject *
stage_frame(PyObject *const *args, Py_ssize_t nargs, reader read, const char *usage)
{
    if (nargs != 7 || !PyDict_Check(args[1]) || !PyList_Check(args[2])
        || !PyDict_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *frame = view.buf;
    PyObject *result = NULL, *key = NULL, *old = NULL, *new = NULL, *store_id, *positions;
    Change r = {NULL, NULL, NULL};
    int got = view.len > 25 && frame[0] == 'w' ? read(frame + 25, view.len - 25, &r) : 0;
    if (got == 0 && PyErr_Occurred()) {
        /* malformed, or not a full old row: the Python path decides, and raises the same;
         * but out of memory is out of memory */
        if (PyErr_ExceptionMatches(PyExc_MemoryError))
            got = -1;
        else
            PyErr_Clear();
    }
    if (got <= 0)
        goto answer;
    if ((got = resolved_entry(args[1], r.name, &store_id, &positions)) <= 0)
        goto answer;
    if (store_id == Py_None) {
        got = 2; /* a table capture does not audit: nothing to store */
        goto answer;
    }
    got = 0;
    if (positions == Py_None)
        key = Py_NewRef(no_value);
    else if ((key = key_of(r.key_from, positions)) == NULL)
        goto decoded;
    if (r.op != op_insert && (old = image(&old_tuple)) == NULL)
        goto decoded;
    if (r.op != op_delete && (new = image(&new_tuple)) == NULL)
        goto decoded;
    got = emit(args[2], args[3], args + 4, store_id, r.op, key, old, new) < 0 ? -1 : 1;
    goto answer;
decoded:
    /* not UTF-8, or a key position past the row: the Python path says so */
    if (PyErr_Occurred() && !PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
        got = -1;
    else
        PyErr_Clear();
answer:
    if (got >= 0)
        result = PyLong_FromLong(got);
    Py_XDECREF(r.name);
    Py_XDECREF(key);
    Py_XDECREF(old);
    Py_XDECREF(new);
    PyBuffer_Release(&view);
    give_back_all();
    return result;
}

static PyObject *
stage(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return stage_frame(args, nargs, read_pgoutput,
                       "stage(frame, resolved: dict, rows: list, counts: dict, change_id, txn_id,"
                       " ord)");
}

static PyObject *
stage_wal2json(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    return stage_frame(args, nargs, read_wal2json,
                       "stage_wal2json(frame, resolved: dict, rows: list, counts: dict,"
                       " change_id, txn_id, ord)");
}

/* -- a PostgreSQL store's images ----------------------------------------------------------- */

/* jsonb's text of a flat array of strings and nulls (``["a", null]``) -> its compact text
 * (``["a",null]``), as str; None for any other text. The same as _JsonText.load's Python path
 * (undo/store/postgres/_store.py, the reference): elements separated by ", ", a string's bytes
 * between quotes with a backslash escaping the byte after it; strict UTF-8. */
static PyObject *
compact_flat_array(PyObject *module, PyObject *arg)
{
    (void)module;
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    const unsigned char *s = view.buf;
    Py_ssize_t n = view.len, i = 0, o = 0;
    char small[512];
    char *out = n <= (Py_ssize_t)sizeof small ? small : PyMem_Malloc((size_t)n);
    PyObject *result = NULL;
    int high = 0, flat = 0;
    if (out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (n < 2 || s[0] != '[')
        goto not_flat;
    out[o++] = '[';
    i = 1;
    if (s[i] != ']') {
        for (;;) {
            if (s[i] == '"') {
                Py_ssize_t start = i++;
                for (;;) {
                    if (i >= n)
                        goto not_flat;
                    unsigned char c = s[i];
                    if (c == '"')
                        break;
                    if (c == '\\') {
                        if (i + 1 >= n)
                            goto not_flat;
                        high |= s[i + 1] & 0x80;
                        i += 2;
                        continue;
                    }
                    high |= c & 0x80;
                    i++;
                }
                i++; /* the closing quote */
                memcpy(out + o, s + start, (size_t)(i - start));
                o += i - start;
            }
            else if (n - i >= 4 && memcmp(s + i, "null", 4) == 0) {
                memcpy(out + o, "null", 4);
                o += 4;
                i += 4;
            }
            else
                goto not_flat;
            if (i < n && s[i] == ']')
                break;
            if (n - i < 3 || s[i] != ',' || s[i + 1] != ' ')
                goto not_flat;
            out[o++] = ',';
            i += 2;
        }
    }
    if (i != n - 1)
        goto not_flat;
    out[o++] = ']';
    flat = 1;
not_flat:
    if (!flat) {
        result = Py_NewRef(Py_None);
    }
    else if (!high) {
        result = PyUnicode_New(o, 127);
        if (result != NULL)
            memcpy(PyUnicode_1BYTE_DATA(result), out, (size_t)o);
    }
    else {
        result = PyUnicode_DecodeUTF8(out, o, NULL);
    }
done:
    if (out != small)
        PyMem_Free(out);
    PyBuffer_Release(&view);
    return result;
}

static PyMethodDef methods[] = {
    {"tuple_tokens", (PyCFunction)(void (*)(void))tuple_tokens, METH_FASTCALL,
     "pgoutput TupleData at pos -> (JSON tokens, unchanged TOAST positions or None, next pos)"},
    {"stage", (PyCFunction)(void (*)(void))stage, METH_FASTCALL,
     "stage one pgoutput change frame into the store writer's rows: 1; not audited: 2; else 0"},
    {"stage_wal2json", (PyCFunction)(void (*)(void))stage_wal2json, METH_FASTCALL,
     "stage one wal2json change frame into the store writer's rows: 1; not audited: 2; else 0"},
    {"compact_flat_array", compact_flat_array, METH_O,
     "jsonb's text of a flat array of strings and nulls -> its compact text; else None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "undo._speedups", "Capture's hot path in C.", -1, methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    null_token = PyUnicode_InternFromString("null");
    no_value = PyUnicode_InternFromString("");
    op_insert = PyUnicode_InternFromString("I");
    op_update = PyUnicode_InternFromString("U");
    op_delete = PyUnicode_InternFromString("D");
    if (null_token == NULL || no_value == NULL || op_insert == NULL || op_update == NULL || op_delete == NULL)
        return NULL;
    return PyModule_Create(&module);
}
