/* The query loop of PrefixIndex.match, compiled.
 *
 * runs(keys, table_keys, table_slots, shared, bits) walks the request's block keys with a
 * running AND of their holder masks (HolderMap's layout: lone-holder keys in the flat table
 * at key % size, the rest in the `shared` dict) and returns [(at, lost_mask), ...]: the
 * replicas whose consecutive run ended at key `at`, in order, the last entry at len(keys)
 * for those holding every key. Same semantics as HolderMap.runs' pure-Python loop, which
 * stays the reference and the fallback; this file only removes the interpreter from the
 * per-key loop (a query is 128 keys on the request path).
 *
 * Masks are Python ints (a mesh may have more than 64 replicas); the table holds uint64 keys
 * ('Q') and uint32 slots ('I').
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

/* The flat table of HolderMap: keys (array('Q')) and slots (array('I')) of one length. */
typedef struct {
    Py_buffer kbuf, sbuf;
    const uint64_t *keys;
    const uint32_t *slots;
    uint64_t size;
} Table;

static int
open_table(PyObject *keys_obj, PyObject *slots_obj, Table *t, const char *who)
{
    if (PyObject_GetBuffer(keys_obj, &t->kbuf, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (PyObject_GetBuffer(slots_obj, &t->sbuf, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyBuffer_Release(&t->kbuf);
        return -1;
    }
    if (t->kbuf.itemsize != 8 || t->sbuf.itemsize != 4 || t->kbuf.len / 8 != t->sbuf.len / 4
        || t->kbuf.len == 0) {
        PyErr_Format(PyExc_TypeError, "%s: table must be array('Q') and array('I') of one "
                                      "non-zero length", who);
        PyBuffer_Release(&t->sbuf);
        PyBuffer_Release(&t->kbuf);
        return -1;
    }
    t->keys = (const uint64_t *)t->kbuf.buf;
    t->slots = (const uint32_t *)t->sbuf.buf;
    t->size = (uint64_t)(t->kbuf.len / 8);
    return 0;
}

static void
close_table(Table *t)
{
    PyBuffer_Release(&t->sbuf);
    PyBuffer_Release(&t->kbuf);
}

static int
append_run(PyObject *out, Py_ssize_t at, PyObject *mask)
{
    PyObject *item = Py_BuildValue("(nO)", at, mask);
    if (item == NULL)
        return -1;
    int rc = PyList_Append(out, item);
    Py_DECREF(item);
    return rc;
}

static PyObject *
runs(PyObject *self, PyObject *args)
{
    PyObject *keys_obj, *tk_obj, *ts_obj, *shared, *bits;
    if (!PyArg_ParseTuple(args, "OOOO!O!", &keys_obj, &tk_obj, &ts_obj, &PyDict_Type, &shared,
                          &PyList_Type, &bits))
        return NULL;

    Table t;
    if (open_table(tk_obj, ts_obj, &t, "runs") < 0)
        return NULL;
    PyObject *keys = NULL, *out = NULL, *active = NULL;
    const uint64_t *tkeys = t.keys;
    const uint32_t *tslots = t.slots;
    const uint64_t size = t.size;
    const Py_ssize_t nbits = PyList_GET_SIZE(bits);

    keys = PySequence_Fast(keys_obj, "runs: keys must be a sequence");
    if (keys == NULL)
        goto done;
    out = PyList_New(0);
    if (out == NULL)
        goto done;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    PyObject **items = PySequence_Fast_ITEMS(keys);

    for (Py_ssize_t at = 0; at < n; at++) {
        PyObject *key = items[at];
        uint64_t k = PyLong_AsUnsignedLongLong(key);
        if (k == (uint64_t)-1 && PyErr_Occurred())
            goto fail;
        uint64_t i = k % size;
        PyObject *mask; /* borrowed */
        if (tkeys[i] == k) {
            uint32_t slot = tslots[i];
            if ((Py_ssize_t)slot >= nbits) {
                PyErr_SetString(PyExc_IndexError, "runs: table slot beyond bits");
                goto fail;
            }
            mask = PyList_GET_ITEM(bits, slot);
        } else {
            mask = PyDict_GetItemWithError(shared, key);
            if (mask == NULL && PyErr_Occurred())
                goto fail;
        }
        if (active == NULL) { /* the first key: its holders are the candidates */
            if (mask == NULL)
                break;
            active = Py_NewRef(mask);
            continue;
        }
        PyObject *next = mask == NULL ? PyLong_FromLong(0) : PyNumber_And(active, mask);
        if (next == NULL)
            goto fail;
        int same = PyObject_RichCompareBool(next, active, Py_EQ);
        if (same < 0) {
            Py_DECREF(next);
            goto fail;
        }
        if (!same) {
            PyObject *lost = PyNumber_Xor(active, next);
            if (lost == NULL || append_run(out, at, lost) < 0) {
                Py_XDECREF(lost);
                Py_DECREF(next);
                goto fail;
            }
            Py_DECREF(lost);
        }
        Py_SETREF(active, next);
        int alive = PyObject_IsTrue(active);
        if (alive < 0)
            goto fail;
        if (!alive)
            goto done;
    }
    if (active != NULL && append_run(out, n, active) < 0)
        goto fail;
    goto done;

fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(active);
    Py_XDECREF(keys);
    close_table(&t);
    return out;
}

/* match64(keys, table_keys, table_slots, shared, names) -> {name: run length}
 *
 * PrefixIndex.match for a mesh of at most 64 replica slots, where slot s's mask is 1 << s:
 * the running AND is a machine word (no int objects per key) and the result dict is built
 * here, one entry per replica whose run ended, named by names[slot].
 */
static PyObject *
match64(PyObject *self, PyObject *args)
{
    PyObject *keys_obj, *tk_obj, *ts_obj, *shared, *names;
    if (!PyArg_ParseTuple(args, "OOOO!O!", &keys_obj, &tk_obj, &ts_obj, &PyDict_Type, &shared,
                          &PyList_Type, &names))
        return NULL;
    if (PyList_GET_SIZE(names) > 64) {
        PyErr_SetString(PyExc_ValueError, "match64: more than 64 replica slots");
        return NULL;
    }
    Table t;
    if (open_table(tk_obj, ts_obj, &t, "match64") < 0)
        return NULL;
    PyObject *keys = NULL, *out = NULL;
    const uint64_t *tkeys = t.keys;
    const uint32_t *tslots = t.slots;
    const uint64_t size = t.size;
    const Py_ssize_t nslots = PyList_GET_SIZE(names);

    keys = PySequence_Fast(keys_obj, "match64: keys must be a sequence");
    if (keys == NULL)
        goto done;
    out = PyDict_New();
    if (out == NULL)
        goto done;
    const Py_ssize_t n = PySequence_Fast_GET_SIZE(keys);
    PyObject **items = PySequence_Fast_ITEMS(keys);
    uint64_t active = 0;
    Py_ssize_t at = 0;
    for (; at < n; at++) {
        PyObject *key = items[at];
        uint64_t k = PyLong_AsUnsignedLongLong(key);
        if (k == (uint64_t)-1 && PyErr_Occurred())
            goto fail;
        /* A key is in exactly one of the table (one holder) and the dict. While several
         * replicas are still in the run, only a dict key can keep more than one of them,
         * so look there first: one memory access per key instead of two. */
        uint64_t mask = 0;
        int in_dict = 0;
        if (active & (active - 1)) {
            PyObject *m = PyDict_GetItemWithError(shared, key);
            if (m == NULL && PyErr_Occurred())
                goto fail;
            if (m != NULL) {
                mask = PyLong_AsUnsignedLongLong(m);
                if (mask == (uint64_t)-1 && PyErr_Occurred())
                    goto fail;
                in_dict = 1;
            }
        }
        if (!in_dict) {
            uint64_t i = k % size;
            if (tkeys[i] == k) {
                if ((Py_ssize_t)tslots[i] >= nslots) {
                    PyErr_SetString(PyExc_IndexError, "match64: table slot beyond names");
                    goto fail;
                }
                mask = (uint64_t)1 << tslots[i];
            } else if (!(active & (active - 1))) {
                PyObject *m = PyDict_GetItemWithError(shared, key);
                if (m == NULL && PyErr_Occurred())
                    goto fail;
                if (m != NULL) {
                    mask = PyLong_AsUnsignedLongLong(m);
                    if (mask == (uint64_t)-1 && PyErr_Occurred())
                        goto fail;
                }
            }
        }
        if (at == 0) {
            active = mask;
            if (!active)
                goto done;
            continue;
        }
        uint64_t next = active & mask, lost = active ^ next;
        if (lost) {
            PyObject *count = PyLong_FromSsize_t(at);
            if (count == NULL)
                goto fail;
            for (; lost; lost &= lost - 1) {
                int slot = __builtin_ctzll(lost);
                if (slot >= nslots || PyDict_SetItem(out, PyList_GET_ITEM(names, slot), count) < 0) {
                    if (slot >= nslots)
                        PyErr_SetString(PyExc_IndexError, "match64: mask bit beyond names");
                    Py_DECREF(count);
                    goto fail;
                }
            }
            Py_DECREF(count);
            active = next;
            if (!active)
                goto done;
        }
    }
    if (active) {
        PyObject *count = PyLong_FromSsize_t(n);
        if (count == NULL)
            goto fail;
        for (uint64_t left = active; left; left &= left - 1) {
            int slot = __builtin_ctzll(left);
            if (slot >= nslots || PyDict_SetItem(out, PyList_GET_ITEM(names, slot), count) < 0) {
                if (slot >= nslots)
                    PyErr_SetString(PyExc_IndexError, "match64: mask bit beyond names");
                Py_DECREF(count);
                goto fail;
            }
        }
        Py_DECREF(count);
    }
    goto done;

fail:
    Py_CLEAR(out);
done:
    Py_XDECREF(keys);
    close_table(&t);
    return out;
}

static PyMethodDef methods[] = {
    {"runs", runs, METH_VARARGS,
     "runs(keys, table_keys, table_slots, shared, bits) -> [(at, lost_mask), ...]"},
    {"match64", match64, METH_VARARGS,
     "match64(keys, table_keys, table_slots, shared, names) -> {name: run length}"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "crdt._match", "PrefixIndex.match's per-key loop, compiled.", -1,
    methods,
};

PyMODINIT_FUNC
PyInit__match(void)
{
    return PyModule_Create(&module);
}
