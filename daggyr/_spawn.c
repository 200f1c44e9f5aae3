/*
 * daggyr._spawn: start a task's process inside its cgroup in one step.
 *
 * The child joins the task's cgroups, drops to the task user, sets the
 * parent-death signal, enters the working directory and execs the command,
 * all between vfork() and execve(), using raw system calls only. That is what
 * makes it safe in a multi-threaded process such as a gRPC server: no lock,
 * no allocation and no Python code runs in the child. Python's preexec_fn
 * would run Python there, which its documentation warns against.
 *
 * A failure in the child is reported through a close-on-exec pipe as the
 * stage that failed and its errno, so the caller can tell a missing working
 * directory from a missing command.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CLOSE_RANGE_CLOEXEC
#define CLOSE_RANGE_CLOEXEC (1U << 2)
#endif

enum stage {
    STAGE_CGROUP = 1,
    STAGE_STDIO = 2,
    STAGE_USER = 3,
    STAGE_PDEATHSIG = 4,
    STAGE_CHDIR = 5,
    STAGE_EXEC = 6,
};

/* The kernel's own struct sigaction (x86_64, arm64 and the other generic
 * layouts), for rt_sigaction called directly. */
struct kernel_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    unsigned long mask;
};

struct report {
    int stage;
    int error;
    int index; /* which cgroup file, for STAGE_CGROUP */
};

/* A NULL-terminated array of C strings borrowed from a sequence of bytes. */
static char **
borrow_strings(PyObject *seq, const char *what)
{
    PyObject *fast = PySequence_Fast(seq, what);
    if (fast == NULL)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    char **out = PyMem_Calloc((size_t)n + 1, sizeof(char *));
    if (out == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(fast, i);
        if (!PyBytes_Check(item)) {
            PyErr_Format(PyExc_TypeError, "%s must hold bytes", what);
            PyMem_Free(out);
            Py_DECREF(fast);
            return NULL;
        }
        /* Items stay alive: the caller keeps the sequence for the call. */
        out[i] = PyBytes_AS_STRING(item);
    }
    Py_DECREF(fast);
    return out;
}

static void
report_and_exit(int fd, int stage, int error, int index)
{
    struct report r = {stage, error, index};
    ssize_t ignored = write(fd, &r, sizeof r);
    (void)ignored;
    _exit(127);
}

/* Runs in the vfork child: system calls only. */
static void
child(const char *path, char **argv, char **envp, const char *cwd,
      char **procs, int stdin_fd, int stdout_fd, int stderr_fd,
      long uid, long gid, pid_t parent, const sigset_t *empty, int report_fd)
{
    /* Every disposition back to the default: handlers would run parent code
     * on the shared memory once signals are unblocked, and what the runner
     * ignores (SIGPIPE, or whatever its own parent ignored) is no business
     * of the task's. The raw call reaches the signals glibc keeps for itself
     * (32 and 33), which its sigaction() refuses to touch. */
    struct kernel_sigaction dfl;
    memset(&dfl, 0, sizeof dfl); /* handler 0 is SIG_DFL */
    for (int sig = 1; sig < _NSIG; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP)
            syscall(SYS_rt_sigaction, sig, &dfl, NULL, sizeof dfl.mask);
    }

    if (setpgid(0, 0) != 0)
        report_and_exit(report_fd, STAGE_STDIO, errno, 0);

    for (int i = 0; procs[i] != NULL; i++) {
        int fd = open(procs[i], O_WRONLY | O_CLOEXEC);
        if (fd < 0)
            report_and_exit(report_fd, STAGE_CGROUP, errno, i);
        if (write(fd, "0", 1) != 1)
            report_and_exit(report_fd, STAGE_CGROUP, errno, i);
        close(fd);
    }

    /* Move any source already at 0-2 out of the way first, so that each dup2
     * below really copies (and so clears close-on-exec on the target). */
    int sources[3] = {stdin_fd, stdout_fd, stderr_fd};
    for (int i = 0; i < 3; i++) {
        if (sources[i] < 3) {
            sources[i] = fcntl(sources[i], F_DUPFD_CLOEXEC, 3);
            if (sources[i] < 0)
                report_and_exit(report_fd, STAGE_STDIO, errno, 0);
        }
    }
    for (int i = 0; i < 3; i++) {
        if (dup2(sources[i], i) < 0)
            report_and_exit(report_fd, STAGE_STDIO, errno, 0);
    }
    /* Nothing else of the runner's reaches the task. */
    if (syscall(SYS_close_range, 3, ~0U, CLOSE_RANGE_CLOEXEC) != 0) {
        for (int fd = 3; fd < 4096; fd++)
            if (fd != report_fd)
                fcntl(fd, F_SETFD, FD_CLOEXEC);
    }

    /* Raw system calls: glibc's wrappers would try to change the
     * credentials of every thread of the parent too. */
    if (gid >= 0) {
        if (syscall(SYS_setgroups, 0, NULL) != 0 ||
            syscall(SYS_setresgid, gid, gid, gid) != 0)
            report_and_exit(report_fd, STAGE_USER, errno, 0);
    }
    if (uid >= 0 && syscall(SYS_setresuid, uid, uid, uid) != 0)
        report_and_exit(report_fd, STAGE_USER, errno, 0);

    /* A task user cannot regain privileges through a setuid binary. */
    if (uid >= 0 && prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
        report_and_exit(report_fd, STAGE_USER, errno, 0);

    /* After the user change, which clears it. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0)
        report_and_exit(report_fd, STAGE_PDEATHSIG, errno, 0);
    if (getppid() != parent)
        _exit(137); /* the runner is already gone */

    if (cwd != NULL && chdir(cwd) != 0)
        report_and_exit(report_fd, STAGE_CHDIR, errno, 0);

    sigprocmask(SIG_SETMASK, empty, NULL);
    execve(path, argv, envp);
    report_and_exit(report_fd, STAGE_EXEC, errno, 0);
}

PyDoc_STRVAR(spawn_doc,
"spawn(path, argv, envp, cwd, procs, stdin_fd, stdout_fd, stderr_fd, uid, gid)\n"
"--\n\n"
"Start path with argv and envp (sequences of bytes) inside the cgroups whose\n"
"procs files are given, as uid/gid (-1 to keep), in cwd (bytes or None),\n"
"in a new process group, with the parent-death signal SIGKILL.\n"
"Returns the pid; or, when the child failed before exec (and was reaped),\n"
"a tuple (stage, errno, index), stage one of 'cgroup', 'stdio', 'user',\n"
"'pdeathsig', 'chdir', 'exec', and index the cgroup file that failed.");

static const char *stage_names[] = {
    "", "cgroup", "stdio", "user", "pdeathsig", "chdir", "exec",
};

static PyObject *
spawn(PyObject *module, PyObject *args)
{
    const char *path;
    PyObject *argv_obj, *envp_obj, *cwd_obj, *procs_obj;
    int stdin_fd, stdout_fd, stderr_fd;
    long uid, gid;
    if (!PyArg_ParseTuple(args, "yOOOOiiill", &path, &argv_obj, &envp_obj,
                          &cwd_obj, &procs_obj, &stdin_fd, &stdout_fd,
                          &stderr_fd, &uid, &gid))
        return NULL;
    const char *cwd = NULL;
    if (cwd_obj != Py_None) {
        if (!PyBytes_Check(cwd_obj)) {
            PyErr_SetString(PyExc_TypeError, "cwd must be bytes or None");
            return NULL;
        }
        cwd = PyBytes_AS_STRING(cwd_obj);
    }

    char **argv = borrow_strings(argv_obj, "argv");
    char **envp = argv ? borrow_strings(envp_obj, "envp") : NULL;
    char **procs = envp ? borrow_strings(procs_obj, "procs") : NULL;
    if (procs == NULL) {
        PyMem_Free(argv);
        PyMem_Free(envp);
        return NULL;
    }

    int pipe_fds[2];
    if (pipe2(pipe_fds, O_CLOEXEC) != 0) {
        PyMem_Free(argv);
        PyMem_Free(envp);
        PyMem_Free(procs);
        return PyErr_SetFromErrno(PyExc_OSError);
    }

    sigset_t all, old, empty;
    sigfillset(&all);
    sigemptyset(&empty);
    pid_t parent = getpid();
    pid_t pid;
    int saved_errno = 0;

    Py_BEGIN_ALLOW_THREADS
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid = vfork();
    if (pid == 0)
        child(path, argv, envp, cwd, procs, stdin_fd, stdout_fd, stderr_fd,
              uid, gid, parent, &empty, pipe_fds[1]);
    saved_errno = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    Py_END_ALLOW_THREADS

    close(pipe_fds[1]);
    PyMem_Free(argv);
    PyMem_Free(envp);
    PyMem_Free(procs);
    if (pid < 0) {
        close(pipe_fds[0]);
        errno = saved_errno;
        return PyErr_SetFromErrno(PyExc_OSError);
    }

    /* The child has exec'd or failed by now (vfork waits for either), so
     * this read never blocks for long. */
    struct report r;
    ssize_t got;
    do {
        got = read(pipe_fds[0], &r, sizeof r);
    } while (got < 0 && errno == EINTR);
    close(pipe_fds[0]);
    if (got == 0)
        return PyLong_FromLong((long)pid);

    int status;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR)
        ;
    if (got != (ssize_t)sizeof r)
        return Py_BuildValue("(sii)", "unknown", 0, 0);
    const char *stage = (r.stage > 0 && r.stage <= STAGE_EXEC)
                            ? stage_names[r.stage] : "unknown";
    return Py_BuildValue("(sii)", stage, r.error, r.index);
}

static PyMethodDef methods[] = {
    {"spawn", spawn, METH_VARARGS, spawn_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "daggyr._spawn",
    "Start a task's process inside its cgroup in one step.", -1, methods,
};

PyMODINIT_FUNC
PyInit__spawn(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    PyObject *all = Py_BuildValue("[s]", "spawn");
    if (all == NULL || PyModule_AddObject(m, "__all__", all) != 0) {
        Py_XDECREF(all);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
