/*
 * Index defaults for a single test node: a new index gets 0 replicas unless its request or a
 * matching index template says otherwise, so that a lone node is green rather than yellow.
 *
 * OpenSearch 2.x has no node setting for this: index.number_of_replicas is not accepted in
 * opensearch.yml, and cluster.default_number_of_replicas is read only from the persistent or
 * transient cluster settings, which can be set only once the node is up and serving HTTP (a test
 * creating its first index at once could race it). An index template would race the same way and
 * would also collide with the caller's own templates (two composable templates of the same
 * priority may not overlap, and "*" overlaps everything). An IndexSettingProvider has neither
 * problem: MetadataCreateIndexService applies what it returns first, then the templates' settings,
 * then the request's, for every index created in any way (create index, auto-create on write,
 * hidden and system indexes).
 *
 * The number of shards needs nothing: it already defaults to 1 in OpenSearch 2.x.
 */
package dev.walrelay.services;

import java.util.Collection;
import java.util.List;

import org.opensearch.cluster.metadata.IndexMetadata;
import org.opensearch.common.settings.Settings;
import org.opensearch.index.shard.IndexSettingProvider;
import org.opensearch.plugins.Plugin;

public final class TestIndexDefaultsPlugin extends Plugin {

    private static final Settings DEFAULTS = Settings.builder().put(IndexMetadata.SETTING_NUMBER_OF_REPLICAS, 0).build();

    public TestIndexDefaultsPlugin() {}

    @Override
    public Collection<IndexSettingProvider> getAdditionalIndexSettingProviders() {
        return List.of(new IndexSettingProvider() {
            @Override
            public Settings getAdditionalIndexSettings(String indexName, boolean isDataStreamIndex, Settings templateAndRequestSettings) {
                return DEFAULTS;
            }
        });
    }
}
