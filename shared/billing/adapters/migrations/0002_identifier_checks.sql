-- Marketplace identifiers end up in request URLs and bodies (GCP's service name is a URL path segment):
-- each must match a safe alphabet with a length limit, so a bad row is refused when it is written,
-- not when its bill is sent. Every constraint is named <table>_<column>_format, so the error names the
-- offending column. Dropped first, so running this file again (by hand) is harmless.

ALTER TABLE customers
    DROP CONSTRAINT IF EXISTS customers_aws_customer_identifier_format,
    DROP CONSTRAINT IF EXISTS customers_aws_account_id_format,
    DROP CONSTRAINT IF EXISTS customers_aws_product_code_format,
    DROP CONSTRAINT IF EXISTS customers_gcp_service_name_format,
    DROP CONSTRAINT IF EXISTS customers_gcp_usage_reporting_id_format,
    DROP CONSTRAINT IF EXISTS customers_azure_resource_id_format,
    DROP CONSTRAINT IF EXISTS customers_azure_resource_uri_format,
    DROP CONSTRAINT IF EXISTS customers_azure_plan_id_format,
    -- AWS Marketplace: BatchMeterUsage's CustomerIdentifier and ProductCode (1..255 characters)
    ADD CONSTRAINT customers_aws_customer_identifier_format
        CHECK (aws_customer_identifier ~ '^[A-Za-z0-9_-]{1,255}$'),
    ADD CONSTRAINT customers_aws_account_id_format
        CHECK (aws_account_id ~ '^[0-9]{12}$'),
    ADD CONSTRAINT customers_aws_product_code_format
        CHECK (aws_product_code ~ '^[A-Za-z0-9_-]{1,255}$'),
    -- Google: the service name is a DNS name (labels of 1..63, 253 in all) and a URL path segment
    -- (/v1/services/{serviceName}:report); usageReportingId looks like project_number:123456789
    ADD CONSTRAINT customers_gcp_service_name_format
        CHECK (char_length(gcp_service_name) <= 253
               AND gcp_service_name ~ '^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)+$'),
    ADD CONSTRAINT customers_gcp_usage_reporting_id_format
        CHECK (gcp_usage_reporting_id ~ '^[A-Za-z0-9_.:-]{1,128}$'),
    -- Azure: a SaaS subscription id is a GUID; a managed app's resourceUri is an ARM resource path
    -- whose segments never start with a dot (no "." or ".." segments); plan ids are at most 50
    ADD CONSTRAINT customers_azure_resource_id_format
        CHECK (azure_resource_id ~ '^[0-9A-Fa-f]{8}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{4}-[0-9A-Fa-f]{12}$'),
    ADD CONSTRAINT customers_azure_resource_uri_format
        CHECK (char_length(azure_resource_uri) <= 1024
               AND azure_resource_uri ~* '^/subscriptions/[A-Za-z0-9-]{1,64}/resourceGroups/[A-Za-z0-9_()][A-Za-z0-9._()-]{0,89}/providers(/[A-Za-z0-9_][A-Za-z0-9._-]{0,127}){2,16}$'),
    ADD CONSTRAINT customers_azure_plan_id_format
        CHECK (azure_plan_id ~ '^[A-Za-z0-9_-]{1,50}$');

-- Dimension names become AWS Dimension, Google metric names (<serviceName>/<dimension>) and Azure
-- dimension ids. 0001's unnamed check allowed "/" and "." (so "a/../b"); this one does not.
ALTER TABLE rate_card
    DROP CONSTRAINT IF EXISTS rate_card_dimension_check,
    DROP CONSTRAINT IF EXISTS rate_card_dimension_format,
    ADD CONSTRAINT rate_card_dimension_format
        CHECK (dimension ~ '^[A-Za-z0-9_-]{1,100}$');
