/* Capture's hot path in C: pgoutput's TupleData -> the JSON tokens of its values.
 *
 * The same function as undo.stream.pgoutput._py_tuple, which stays the reference and the
 * fallback where this module was not built (tests/unit/test_speedups.py holds them equal). A
 * token is what json.encoder.encode_basestring makes of the value's text: the UTF-8 bytes as
 * sent, between quotes, with '"', '\\' and control characters escaped; "null" for a NULL or a
 * TOASTed value an UPDATE left unchanged (whose position goes into the second list).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *null_token; /* "null" */

/* scratch space for one token, grown as needed; the GIL is held throughout */
static char *scratch;
static Py_ssize_t scratch_size;

static int
reserve(Py_ssize_t n)
{
    if (n <= scratch_size)
        return 0;
    Py_ssize_t size = n < 256 ? 256 : n * 2;
    char *p = PyMem_Realloc(scratch, (size_t)size);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    scratch = p;
    scratch_size = size;
    return 0;
}

static const char hexdigits[] = "0123456789abcdef";

/* the JSON token of n bytes of UTF-8 text */
static PyObject *
token(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t extra = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '"' || c == '\\')
            extra += 1;
        else if (c < 0x20)
            extra += (c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t') ? 1 : 5;
    }
    if (reserve(n + extra + 2) < 0)
        return NULL;
    char *out = scratch;
    Py_ssize_t o = 0;
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
    /* strict UTF-8, as bytes.decode() in the Python version: the same UnicodeDecodeError */
    return PyUnicode_DecodeUTF8(out, o, NULL);
}

static PyObject *
truncated(void)
{
    PyErr_SetString(PyExc_ValueError, "pgoutput: truncated tuple data");
    return NULL;
}

/* tuple_tokens(buf: bytes, pos: int) -> (tokens, unchanged positions or None, next position) */
static PyObject *
tuple_tokens(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "tuple_tokens(buf: bytes, pos: int)");
        return NULL;
    }
    const unsigned char *buf = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t size = PyBytes_GET_SIZE(args[0]);
    Py_ssize_t pos = PyLong_AsSsize_t(args[1]);
    if (pos == -1 && PyErr_Occurred())
        return NULL;
    if (pos < 0 || pos + 2 > size)
        return truncated();
    Py_ssize_t n = ((Py_ssize_t)buf[pos] << 8) | buf[pos + 1];
    pos += 2;
    PyObject *values = PyList_New(n);
    PyObject *unchanged = NULL;
    if (values == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (pos >= size)
            goto truncated;
        unsigned char kind = buf[pos];
        PyObject *v;
        if (kind == 't') {
            if (pos + 5 > size)
                goto truncated;
            uint32_t len = ((uint32_t)buf[pos + 1] << 24) | ((uint32_t)buf[pos + 2] << 16)
                           | ((uint32_t)buf[pos + 3] << 8) | (uint32_t)buf[pos + 4];
            pos += 5;
            if (len > 0x7FFFFFFF || (Py_ssize_t)len > size - pos)
                goto truncated;
            v = token(buf + pos, (Py_ssize_t)len);
            if (v == NULL)
                goto error;
            pos += (Py_ssize_t)len;
        }
        else if (kind == 'n' || kind == 'u') {
            pos += 1;
            v = Py_NewRef(null_token);
            if (kind == 'u') {
                if (unchanged == NULL && (unchanged = PyList_New(0)) == NULL) {
                    Py_DECREF(v);
                    goto error;
                }
                PyObject *at = PyLong_FromSsize_t(i);
                if (at == NULL || PyList_Append(unchanged, at) < 0) {
                    Py_XDECREF(at);
                    Py_DECREF(v);
                    goto error;
                }
                Py_DECREF(at);
            }
        }
        else {
            PyErr_Format(PyExc_ValueError, "pgoutput: unexpected tuple column kind '%c'", kind);
            goto error;
        }
        PyList_SET_ITEM(values, i, v);
    }
    PyObject *result = Py_BuildValue("(NOn)", values, unchanged ? unchanged : Py_None, pos);
    Py_XDECREF(unchanged);
    return result;
truncated:
    truncated();
error:
    Py_DECREF(values);
    Py_XDECREF(unchanged);
    return NULL;
}

static PyMethodDef methods[] = {
    {"tuple_tokens", (PyCFunction)(void (*)(void))tuple_tokens, METH_FASTCALL,
     "pgoutput TupleData at pos -> (JSON tokens, unchanged TOAST positions or None, next pos)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "undo._speedups", "Capture's hot path in C.", -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    null_token = PyUnicode_InternFromString("null");
    if (null_token == NULL)
        return NULL;
    return PyModule_Create(&module);
}
