/*
 * A real OpenSearch node for walrelay's tests, started from the Maven Central jars.
 *
 * OpenSearch's distribution starts a node through its Bootstrap class, which loads the modules from
 * a modules/ folder of the tarball; the tarball is not on Maven Central. This launcher builds the
 * same Node, but hands it the module plugins that are on its classpath instead (Node's protected
 * constructor that takes plugin classes). What Bootstrap adds on top is left out on purpose: the
 * security manager, the native checks (mlockall, system call filter), the keystore and the
 * production bootstrap checks; none of them matter for a loopback test node.
 *
 * Usage: java -cp 'lib/*' dev.walrelay.services.OpenSearchNode key=value...
 *   every argument is a node setting (a leading "-E" is accepted and ignored); path.home is
 *   required. opensearch.sh builds the argument list; see its `run` subcommand.
 *
 * It blocks until the JVM is asked to stop (SIGTERM, SIGINT), then closes the node from a shutdown
 * hook and waits up to 10 s for it. If the node cannot be built or started it prints why on stderr
 * and exits with status 1.
 */
package dev.walrelay.services;

import java.io.IOException;
import java.nio.file.Files;
import java.nio.file.Path;
import java.nio.file.Paths;
import java.util.Collections;
import java.util.List;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.TimeUnit;

import org.apache.logging.log4j.LogManager;
import org.apache.logging.log4j.Logger;
import org.apache.logging.log4j.core.LoggerContext;
import org.apache.logging.log4j.core.config.Configurator;
import org.opensearch.Build;
import org.opensearch.Version;
import org.opensearch.analysis.common.CommonAnalysisPlugin;
import org.opensearch.common.settings.Settings;
import org.opensearch.env.Environment;
import org.opensearch.http.HttpServerTransport;
import org.opensearch.index.mapper.MapperExtrasPlugin;
import org.opensearch.index.reindex.ReindexPlugin;
import org.opensearch.node.InternalSettingsPreparer;
import org.opensearch.node.Node;
import org.opensearch.painless.PainlessPlugin;
import org.opensearch.plugins.Plugin;
import org.opensearch.transport.Netty4Plugin;
import org.opensearch.transport.TransportService;

public final class OpenSearchNode {

    /**
     * The modules a distribution would load from modules/ that the tests rely on (each of them is
     * also published as a jar on Maven Central, see pom.xml), and this launcher's own plugin.
     */
    static final List<Class<? extends Plugin>> MODULES = List.of(
        Netty4Plugin.class,         // transport-netty4: the REST API on http.port, the transport port
        ReindexPlugin.class,        // reindex: _delete_by_query, _update_by_query, _reindex
        CommonAnalysisPlugin.class, // analysis-common: the analyzers and filters beyond "standard"
        MapperExtrasPlugin.class,   // mapper-extras: scaled_float, token_count, search_as_you_type, ...
        PainlessPlugin.class,       // lang-painless: scripts in updates, queries and sorts
        TestIndexDefaultsPlugin.class // ours: new indexes default to 0 replicas (green on one node)
    );

    /** A Node with the classpath modules; no bootstrap checks (Node's own hook is a no-op). */
    private static final class ClasspathNode extends Node {
        ClasspathNode(Environment environment) {
            // third argument: forbidPrivateIndexSettings, true as in a production node
            super(environment, MODULES, true);
        }
    }

    private static final CountDownLatch STOPPED = new CountDownLatch(1);
    private static volatile Node node;
    private static volatile boolean stopping;

    private OpenSearchNode() {}

    public static void main(String[] args) {
        final Settings settings;
        try {
            settings = parseSettings(args);
        } catch (IllegalArgumentException e) {
            System.err.println("opensearch-launcher: " + e.getMessage());
            System.err.println("usage: java -cp 'lib/*' " + OpenSearchNode.class.getName() + " path.home=DIR [key=value...]");
            System.exit(2);
            return;
        }

        // Before the first logger: the shutdown hook must be in place however far start-up gets.
        Runtime.getRuntime().addShutdownHook(new Thread(OpenSearchNode::shutdown, "opensearch-launcher-shutdown"));

        final Logger logger = LogManager.getLogger(OpenSearchNode.class);
        try {
            final Environment environment = prepare(settings);
            node = new ClasspathNode(environment);
            node.start();
        } catch (Throwable t) {
            if (stopping) {
                // SIGTERM during start-up: the hook is closing the node; not a failure of ours.
                return;
            }
            System.err.println("opensearch-launcher: OpenSearch " + Version.CURRENT + " failed to start: " + describe(t));
            t.printStackTrace(System.err);
            System.err.flush();
            // The hook closes whatever part of the node was built.
            System.exit(1);
            return;
        }

        try {
            final String http = node.injector().getInstance(HttpServerTransport.class).boundAddress().publishAddress().toString();
            final String transport = node.injector().getInstance(TransportService.class).boundAddress().publishAddress().toString();
            logger.info(
                "OpenSearch {} ({}) started: http {}, transport {}, cluster [{}], node [{}], home {}",
                Version.CURRENT,
                Build.CURRENT.getQualifiedVersion(),
                http,
                transport,
                settings.get("cluster.name", "opensearch"),
                settings.get("node.name", "-"),
                settings.get("path.home")
            );
        } catch (RuntimeException e) {
            logger.warn("started, but the bound addresses could not be read", e);
        }

        // Block until the JVM shuts down; the hook counts this down once the node is closed.
        while (true) {
            try {
                STOPPED.await();
                return;
            } catch (InterruptedException e) {
                // keep waiting: only the shutdown hook ends the node
            }
        }
    }

    /** Turns `key=value` arguments (optionally prefixed by -E) into node settings. */
    static Settings parseSettings(String[] args) {
        final Settings.Builder builder = Settings.builder();
        for (int i = 0; i < args.length; i++) {
            String arg = args[i];
            if (arg.equals("-E")) {
                if (++i == args.length) {
                    throw new IllegalArgumentException("-E needs a key=value after it");
                }
                arg = args[i];
            } else if (arg.startsWith("-E")) {
                arg = arg.substring(2);
            }
            final int eq = arg.indexOf('=');
            if (eq <= 0) {
                throw new IllegalArgumentException("not a key=value setting: " + arg);
            }
            builder.put(arg.substring(0, eq), arg.substring(eq + 1));
        }
        final Settings settings = builder.build();
        if (settings.get("path.home") == null) {
            throw new IllegalArgumentException("path.home is required");
        }
        return settings;
    }

    /**
     * Creates the folders a node expects under path.home (config/, plugins/ and modules/ stay empty:
     * the modules come from the classpath) and resolves the settings the way the distribution does;
     * a path.home/config/opensearch.yml, if there is one, is read too.
     */
    private static Environment prepare(Settings settings) throws IOException {
        final Path home = Paths.get(settings.get("path.home")).toAbsolutePath();
        for (String sub : new String[] { "config", "plugins", "modules" }) {
            Files.createDirectories(home.resolve(sub));
        }
        for (String key : new String[] { "path.logs" }) {
            final String p = settings.get(key);
            if (p != null) {
                Files.createDirectories(Paths.get(p));
            }
        }
        for (String p : settings.getAsList("path.data")) {
            Files.createDirectories(Paths.get(p));
        }
        Files.createDirectories(Paths.get(System.getProperty("java.io.tmpdir")));
        final String nodeName = settings.get("node.name", "walrelay-test");
        return InternalSettingsPreparer.prepareEnvironment(settings, Collections.emptyMap(), null, () -> nodeName);
    }

    /** The shutdown hook: close the node, wait for it, then stop log4j (its own hook is disabled). */
    private static void shutdown() {
        stopping = true;
        final Node n = node;
        try {
            if (n != null) {
                LogManager.getLogger(OpenSearchNode.class).info("stopping OpenSearch");
                n.close();
                if (n.awaitClose(10, TimeUnit.SECONDS) == false) {
                    System.err.println("opensearch-launcher: the node did not close within 10 s");
                } else {
                    LogManager.getLogger(OpenSearchNode.class).info("OpenSearch stopped");
                }
            }
        } catch (IOException | RuntimeException e) {
            System.err.println("opensearch-launcher: closing the node failed: " + describe(e));
        } catch (InterruptedException e) {
            Thread.currentThread().interrupt();
        } finally {
            STOPPED.countDown();
            final org.apache.logging.log4j.spi.LoggerContext context = LogManager.getContext(false);
            if (context instanceof LoggerContext) {
                Configurator.shutdown((LoggerContext) context);
            }
        }
    }

    /** The exception's chain of messages on one line: the innermost is usually the real reason. */
    private static String describe(Throwable t) {
        final StringBuilder sb = new StringBuilder();
        for (Throwable c = t; c != null; c = c.getCause() == c ? null : c.getCause()) {
            if (sb.length() > 0) {
                sb.append("; caused by ");
            }
            sb.append(c.getClass().getSimpleName()).append(": ").append(c.getMessage());
        }
        return sb.toString();
    }
}
